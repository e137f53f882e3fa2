"""A LoRA fine-tune saves its adapter in PEFT's format: peft itself loads it on the parent's
transformers export and computes the fine-tuned model's logits; minlm reads it back exactly."""

from __future__ import annotations

import json

import pytest
import torch

from minlm import ModelConfig, TrainConfig, runs
from minlm.adapters import ADAPTER_DIR, load_adapter, save_adapter
from minlm.chatdata import write_conversations
from minlm.export import export_hf
from minlm.finetune import LoRALinear, add_lora, merge_lora, sft
from minlm.model import LM
from minlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

CONVS = [[{"role": "user", "content": f"What colour is the {thing}?"},
          {"role": "assistant", "content": f"The {thing} is {colour}."}]
         for thing, colour in [("sky", "blue"), ("grass", "green"), ("sun", "yellow")]] * 4
SHAPE = {"vocab_size": 512, "dim": 16, "n_layers": 2, "n_heads": 2, "block_size": 64}


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tinystories-512")


def make_parent(tmp_path, tok, preset: str):
    torch.manual_seed(0)
    extra = {"multiple_of": 8, "n_kv_heads": 1} if preset.startswith("llama") else {}
    model = LM(ModelConfig.from_preset(preset, **SHAPE, **extra))
    run_dir = tmp_path / "runs" / "base"
    run_dir.mkdir(parents=True)
    runs.save_configs(run_dir, model.config, TrainConfig(preset=preset),
                      meta={"tokenizer_hash": tok.hash, "params": model.num_params()})
    runs.save_weights(run_dir, model)
    runs.copy_tokenizer(run_dir, tok)
    runs.write_log(run_dir, [])
    return run_dir


@pytest.mark.parametrize("preset,targets", [("llama-1m", "all"), ("gpt2-1m", "q_proj,v_proj"),
                                            ("gpt2-1m", "all")])
def test_peft_loads_the_saved_adapter_on_the_export(tmp_path, tok, preset, targets):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    parent = make_parent(tmp_path, tok, preset)
    chat = tmp_path / "chat.jsonl"
    write_conversations(CONVS, chat)
    result = sft(parent, chat, max_steps=3, batch_size=4, lr=3e-2, lora_rank=2,
                 lora_targets=targets, verbose=False, device="cpu", run_name="tuned")
    tuned = runs.load_run(result.run_dir)
    adapter = result.run_dir / ADAPTER_DIR
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["base_model_name_or_path"] == "base"
    assert tuned.meta["lora"]["peft_adapter"] == ADAPTER_DIR

    export = export_hf(parent, tmp_path / "base-hf")
    hf = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(export), adapter).eval()
    ids = torch.tensor([tok.encode("Once upon a time, the sky was blue.", bos=True)])
    with torch.no_grad():
        ours = tuned.model.eval()(ids)[0]
        theirs = hf(ids).logits
        base = AutoModelForCausalLM.from_pretrained(export)(ids).logits
    assert (ours - base).abs().max() > 1e-3  # the adapter changed something
    print(f"\n{preset} {targets}: max abs logit difference peft vs minlm "
          f"{(ours - theirs).abs().max().item():.2e}")
    assert (ours - theirs).abs().max() < 1e-4

    model = runs.load_run(parent).model.eval()  # minlm reads the same folder back
    wrapped = load_adapter(model, adapter)
    assert wrapped == tuned.meta["lora"]["layers"]
    with torch.no_grad():
        assert (model(ids)[0] - ours).abs().max() < 1e-5
    rows = model.trace(ids).rows
    assert {r.path for r in rows if r.module == "LoRALinear"} == set(wrapped)  # traced too
    assert merge_lora(model) == len(wrapped)  # and merging gives a plain model again
    with torch.no_grad():
        assert (model(ids)[0] - ours).abs().max() < 1e-5


def test_save_and_load_round_trip_and_refusals(tmp_path):
    torch.manual_seed(1)
    cfg = ModelConfig.from_preset("llama-1m", **SHAPE, multiple_of=8)
    model = LM(cfg).eval()
    with pytest.raises(ValueError, match="no LoRA adapters to save"):
        save_adapter(model, tmp_path / "none")
    add_lora(model, rank=4, alpha=8.0, targets="q_proj,down")
    for m in model.modules():
        if isinstance(m, LoRALinear):
            torch.nn.init.normal_(m.lora_b, std=0.3)
    save_adapter(model, tmp_path / "a", base="x")
    again = LM(cfg).eval()
    again.load_state_dict({k: v for k, v in model.state_dict().items() if "lora_" not in k
                           and ".base." not in k} | {k.replace(".base.", "."): v for k, v in
                                                      model.state_dict().items() if ".base." in k})
    assert load_adapter(again, tmp_path / "a") == ["blocks.0.mixer.q_proj", "blocks.0.mlp.down",
                                                   "blocks.1.mixer.q_proj", "blocks.1.mlp.down"]
    ids = torch.randint(0, 512, (2, 9))
    with torch.no_grad():
        assert torch.equal(again(ids)[0], model(ids)[0])
    config_path = tmp_path / "a" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(ValueError, match="use_dora=True cannot be loaded into minlm's LoRA"):
        load_adapter(LM(cfg), tmp_path / "a")
