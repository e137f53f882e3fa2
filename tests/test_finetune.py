"""Fine-tuning: SFT lowers the assistant-token loss while masked targets get no gradient,
LoRA counts and merges exactly, DPO starts at log 2 and moves towards the chosen reply, and
every fine-tune leaves a run folder that loads and chats."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from minlm import ModelConfig, TrainConfig, runs
from minlm.chatdata import chat_example, chat_examples, write_conversations
from minlm.cli import main
from minlm.finetune import (
    LoRALinear,
    SFTConfig,
    add_lora,
    collate,
    count_trainable,
    dpo,
    dpo_loss,
    lora_disabled,
    masked_loss,
    merge_lora,
    preference_examples,
    sequence_logps,
    sft,
    sft_loss,
)
from minlm.generate import Chat
from minlm.model import LM
from minlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

# a tiny, repetitive chat set: the assistant's replies are easy to learn
CONVS = [[{"role": "user", "content": f"What colour is the {thing}?"},
          {"role": "assistant", "content": f"The {thing} is {colour}."}]
         for thing, colour in [("sky", "blue"), ("grass", "green"), ("sun", "yellow"),
                               ("snow", "white"), ("night", "dark"), ("cat", "grey")]] * 4


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tinystories-512")


def tiny_cfg(**overrides) -> ModelConfig:  # about 10k parameters, most of them the embedding
    shape = dict(vocab_size=512, dim=16, n_layers=1, n_heads=2, n_kv_heads=0, block_size=96,
                 multiple_of=8)
    return ModelConfig.from_preset("llama-1m", **{**shape, **overrides})


@pytest.fixture
def parent(tmp_path, tok):
    """A run folder holding an untrained tiny model, as a pretraining run leaves it."""
    torch.manual_seed(0)
    model = LM(tiny_cfg())
    run_dir = tmp_path / "runs" / "base"
    run_dir.mkdir(parents=True)
    runs.save_configs(run_dir, model.config, TrainConfig(preset="llama-1m"),
                      meta={"tokenizer_hash": tok.hash, "params": model.num_params()})
    runs.save_weights(run_dir, model)
    runs.copy_tokenizer(run_dir, tok)
    runs.write_log(run_dir, [])
    return run_dir


@pytest.fixture
def chat_file(tmp_path):
    path = tmp_path / "chat.jsonl"
    write_conversations(CONVS, path)
    return path


def test_masked_targets_contribute_no_gradient(tok):
    model = LM(tiny_cfg())
    examples, _ = chat_examples(tok, CONVS[:4], "response", max_len=97)
    x, y, m = collate(examples, tok.pad_id)
    assert 0 < m.sum() < m.numel()
    logits, loss = sft_loss(model, x, y, m)
    logits.retain_grad()
    loss.backward()
    assert (logits.grad[m == 0] == 0).all() and (logits.grad[m == 1] != 0).any()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    y2 = torch.where(m == 0, torch.randint_like(y, 0, 512), y)  # other targets where masked
    _, loss2 = sft_loss(model, x, y2, m)
    loss2.backward()
    assert loss2.item() == pytest.approx(loss.item(), abs=1e-6)
    for g, p in zip(grads, model.parameters()):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=1e-7)


def test_sft_lowers_assistant_loss_and_leaves_a_run(parent, chat_file, tok):
    examples = [chat_example(tok, c) for c in CONVS[:6]]
    before = masked_loss(runs.load_run(parent).model, examples, pad_id=tok.pad_id)
    result = sft(parent, chat_file, epochs=6, batch_size=4, lr=3e-2, warmup_iters=2,
                 val_fraction=0.2, eval_interval=0, patience=0, verbose=False, device="cpu")
    # 20 train examples of ~32 tokens packed 2-3 to a row of 97: 7-10 rows, 2-3 batches of 4
    assert not result.stopped and result.epochs == 6 and 6 * 2 <= result.step <= 6 * 3
    assert result.val_loss < result.val_loss_before - 0.5
    run = runs.load_run(result.run_dir)
    after = masked_loss(run.model, examples, pad_id=tok.pad_id)
    assert after < before - 0.5, (before, after)
    # the folder: same layout as a pretraining run, recording its parent
    assert result.run_dir == parent.parent / "base-sft"
    for name in ("model_config.json", "train_config.json", "model.safetensors", "log.csv",
                 "tokenizer.model"):
        assert (result.run_dir / name).exists(), name
    meta = run.meta
    assert meta["parent"] == parent.name and meta["kind"] == "sft"
    assert meta["finetune"]["mode"] == "response" and meta["status"] == "finished"
    assert meta["data_meta"]["conversations"] == len(CONVS)
    assert run.train_config.data == chat_file.name and run.model_config == tiny_cfg()
    log = runs.read_log(result.run_dir)
    assert log["step"].iloc[0] == 0
    assert log["val_loss"].iloc[0] == pytest.approx(result.val_loss_before)
    assert list(log.columns[-2:]) == ["epoch", "trained_tokens"] and log["epoch"].iloc[-1] == 6
    assert runs.list_runs(parent.parent)["run"].tolist().count("base-sft") == 1
    # it chats through generate.Chat with the template it was trained on
    reply = Chat(run.model, tok, max_new_tokens=8, temperature=0).reply("What colour is the sky?")
    assert isinstance(reply, str)
    with pytest.raises(runs.RunError, match="already exists.*overwrite=true"):
        sft(parent, chat_file, max_steps=1, verbose=False)


@pytest.mark.parametrize("seed", range(4))
def test_packed_sft_plans_the_steps_it_takes(parent, tmp_path, seed):
    """Regression: the plan counted one unshuffled epoch, but packing conversations of mixed
    lengths fills a different number of rows in each shuffled order; the schedule then ended
    early and the progress bar ran past 100 % (1415 steps of 1406 on hh_rlhf_helpful_sft)."""
    convs = [[{"role": "user", "content": f"Tell me about the {thing}."},
              {"role": "assistant", "content": f"The {thing} is" + " very" * (3 * k) + " nice."}]
             for k, thing in enumerate(["sky", "grass", "sun", "snow", "night", "cat", "dog",
                                        "tree", "sea", "moon", "rain", "wind"] * 2)]
    path = tmp_path / "mixed.jsonl"
    write_conversations(convs, path)
    result = sft(parent, path, epochs=3, batch_size=1, val_fraction=0.1, eval_interval=0,
                 patience=0, seed=seed, run_name=f"mixed-{seed}", verbose=False, device="cpu")
    planned = runs.load_run(result.run_dir).train_config.max_iters
    assert result.epochs == 3 and result.step == planned


def test_sft_stops_early_and_keeps_the_best_weights(parent, chat_file):
    result = sft(parent, chat_file, epochs=5, batch_size=2, lr=2.0, warmup_iters=0,
                 eval_interval=1, patience=2, val_fraction=0.2, verbose=False, device="cpu",
                 run_name="diverged")
    assert result.stopped.startswith("early stop") and result.step < 5 * 10
    log = runs.read_log(result.run_dir)
    best = log["val_loss"].min()
    assert result.val_loss == pytest.approx(best)
    assert (log["val_loss"].dropna().iloc[-2:] > best).all()  # rose twice in a row
    kept = runs.load_run(result.run_dir).model
    if result.best_step == 0:  # the parent's weights were the best: they are what is saved
        base = runs.load_run(parent).model
        for a, b in zip(kept.state_dict().values(), base.state_dict().values()):
            torch.testing.assert_close(a, b)
    assert "stopped at step" in runs.load_run(result.run_dir).meta["status"]


def test_lora_parameter_count_and_merge(tok):
    cfg = tiny_cfg(n_layers=2, n_kv_heads=1)
    model = LM(cfg).eval()
    C, H, K, D, r = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size, 4
    names = add_lora(model, rank=r, alpha=8.0, targets="q_proj,v_proj")
    assert names == [f"blocks.{i}.mixer.{p}" for i in range(2) for p in ("q_proj", "v_proj")]
    expected = cfg.n_layers * r * ((C + H * D) + (C + K * D))
    assert count_trainable(model) == expected
    assert all(("lora_" in n) == p.requires_grad for n, p in model.named_parameters())
    x = torch.randint(0, 512, (2, 12))
    base_logits = model(x)[0]
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, LoRALinear):
                m.lora_b.normal_(0, 0.5)
    adapted = model(x)[0]
    assert not torch.allclose(adapted, base_logits)
    with lora_disabled(model):
        torch.testing.assert_close(model(x)[0], base_logits)
    assert merge_lora(model) == 4
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    torch.testing.assert_close(model(x)[0], adapted, rtol=1e-5, atol=1e-5)
    assert sorted(model.state_dict()) == sorted(LM(cfg).state_dict())  # a plain LM again
    all_cfg = LM(cfg)
    n_all = len(add_lora(all_cfg, rank=2, targets="all"))
    assert n_all == cfg.n_layers * 7  # q, k, v, o, gate, up, down
    with pytest.raises(ValueError, match="lora_targets='qproj' is invalid: qproj matches no "
                                         "linear layer.*available: down, gate, k_proj"):
        add_lora(LM(cfg), rank=2, targets="qproj")
    with pytest.raises(ValueError, match="LoRA wraps plain nn.Linear.*BitLinear"):
        add_lora(LM(tiny_cfg(linear="bitlinear")), rank=2)


def test_lora_sft_saves_merged_weights_that_load(parent, chat_file, tok):
    result = sft(parent, chat_file, max_steps=3, batch_size=4, lr=1e-2, lora_rank=2,
                 lora_targets="q_proj,v_proj", verbose=False, device="cpu", run_name="lora")
    run = runs.load_run(result.run_dir)  # strict load: plain LM weights, adapters merged
    meta = run.meta
    assert meta["lora"]["rank"] == 2 and meta["trainable_params"] == 2 * (16 + 16) * 2
    base = runs.load_run(parent).model
    changed = [n for n, p in run.model.state_dict().items()
               if not torch.equal(p, base.state_dict()[n])]
    assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)


def test_dpo_loss_is_log2_at_the_reference_and_its_gradient_prefers_chosen(tok):
    lp = torch.randn(5)
    loss, chosen, rejected = dpo_loss(lp, lp - 1.0, lp, lp - 1.0, beta=0.3)
    assert loss.item() == pytest.approx(math.log(2)) and (chosen == 0).all()
    model = LM(tiny_cfg())
    reference = copy.deepcopy(model).eval()
    pair = {"prompt": [{"role": "user", "content": "Is the sky blue?"}],
            "chosen": "Yes, it is blue.", "rejected": "No, it is a cat."}
    c, r = preference_examples(tok, pair, max_len=97)
    assert c.mask.count(1) == len(tok.encode(pair["chosen"])) + 1
    x, y, m = collate([c, r], tok.pad_id)

    def logps(mdl):
        out = sequence_logps(mdl, x, y, m)
        return out[0], out[1]

    with torch.no_grad():
        ref_c, ref_r = logps(reference)
    pol_c, pol_r = logps(model)
    loss, *_ = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-6)
    loss.backward()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    gap_before = (pol_c - pol_r).item()
    for _ in range(5):
        opt.step()
        opt.zero_grad()
        pol_c, pol_r = logps(model)
        loss, chosen, rejected = dpo_loss(pol_c, pol_r, ref_c, ref_r, beta=0.1)
        loss.backward()
    assert (pol_c - pol_r).item() > gap_before + 0.1
    assert loss.item() < math.log(2) and (chosen > rejected).all()


def test_dpo_run_logs_margins_and_accuracy(parent, tmp_path):
    rows = [{"prompt": c[:1], "chosen": c[1]["content"], "rejected": "I do not know."}
            for c in CONVS]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    result = dpo(parent, path, epochs=2, batch_size=4, lr=1e-2, warmup_iters=0, eval_interval=0,
                 patience=0, val_fraction=0.2, verbose=False, device="cpu")
    assert result.val_loss_before == pytest.approx(math.log(2), abs=1e-5)
    assert result.val_loss < result.val_loss_before
    assert result.metrics["reward_accuracy"] > 0.5 and result.metrics["reward_margin"] > 0
    log = runs.read_log(result.run_dir)
    for col in ("reward_margin", "reward_accuracy", "val_reward_margin", "val_reward_accuracy"):
        assert col in log.columns
    assert runs.load_run(result.run_dir).meta["kind"] == "dpo"


def test_cli_sft_and_dpo(parent, chat_file, tmp_path, capsys):
    assert main(["sft", str(parent), "--data", str(chat_file), "max_steps=2", "batch_size=4",
                 "verbose=false", "device=cpu", "mode=imitation", "run_name=cli-sft"]) == 0
    assert "sft run" in capsys.readouterr().out
    assert (parent.parent / "cli-sft" / "model.safetensors").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(chat_file.read_text() + '{"messages": [{"role": "user"}]}\n')
    assert main(["sft", str(parent), "--data", str(bad), "verbose=false"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"line {len(CONVS) + 1}: message 0 (user) has content" in err
    assert main(["sft", str(parent), "--data", str(chat_file), "mode=chatty"]) == 2
    assert "mode='chatty' is invalid" in capsys.readouterr().err
    assert main(["dpo", str(parent / "nope")]) == 2
    assert "no run folder" in capsys.readouterr().err


def test_config_validation():
    with pytest.raises(ValueError, match="epochs=0 is invalid"):
        SFTConfig(epochs=0)
    with pytest.raises(ValueError, match="unknown SFTConfig field"):
        SFTConfig().with_overrides(["beta=0.1"])
    assert SFTConfig().with_overrides(["lora_rank=8", "pack=false"]).lora_rank == 8


def test_chat_widget_sends_and_resets(parent, tok):
    from minlm.widgets import ChatWidget

    widget = ChatWidget(runs.load_run(parent), max_new_tokens=6, temperature=0)
    reply = widget.send("Hello there")
    assert isinstance(reply, str) and widget.chat.history[0] == ("user", "Hello there")
    widget.text.value = "typed and entered"  # what pressing Enter in the box does
    assert widget.text.value == "" and widget.chat.history[2] == ("user", "typed and entered")
    widget.reset()
    assert widget.chat.history == []
