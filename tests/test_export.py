"""Runs that travel: export to transformers and GGUF, import of Hugging Face checkpoints.

The exported folders are loaded by ``transformers`` in a ``python -I`` subprocess run outside
the repo, so nothing of minlm can be imported there; the CLI is run as a real subprocess.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers", reason="export needs requirements-dev.txt")

from minlm.data import read_documents  # noqa: E402
from minlm.export import export_gguf, export_hf, rope_deinterleave  # noqa: E402
from minlm.generate import generate, generate_ids  # noqa: E402
from minlm.runs import load_run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "trained_models"
pytestmark = pytest.mark.usefixtures("one_thread")

# Run by ``python -I`` (no PYTHONPATH, no cwd on the path) in a folder outside the repo, with
# minlm made unimportable even where it is pip-installed (CI installs it editable).
CHECK = r"""
import json, sys
sys.modules["minlm"] = None  # an installed minlm (pip install -e .) is hidden: transformers alone
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
try:
    import minlm  # noqa: F401
    raise AssertionError("minlm must not be importable here")
except ImportError:
    pass
torch.set_num_threads(1)
job = json.load(open(sys.argv[1]))
out = {}
for name, folder in job["folders"].items():
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tok = AutoTokenizer.from_pretrained(folder)
    prompt = tok(job["prompt"], return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(torch.tensor(job["idx"])).logits
        greedy = model.generate(prompt, max_new_tokens=job["new"], do_sample=False)
    torch.save(logits, f"{folder}.logits.pt")
    out[name] = {"class": type(model).__name__, "ids": [tok(s).input_ids for s in job["stories"]],
                 "prompt": prompt[0].tolist(), "greedy": greedy[0, prompt.shape[1]:].tolist()}
json.dump(out, open(sys.argv[2], "w"))
"""


def _cli(*args, runs_dir: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    if runs_dir is not None:
        env["MINLM_RUNS_DIR"] = str(runs_dir)
    return subprocess.run([sys.executable, "-m", "minlm", *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=600)


def _stories(shared_data: Path, n: int = 100) -> list[str]:
    return list(itertools.islice(read_documents(shared_data / "tinystories" / "valid.txt"), n))


def _until_eos(ids: list[int], eos: int) -> list[int]:
    return ids[:ids.index(eos) + 1] if eos in ids else ids


@pytest.fixture(scope="module")
def exported(tmp_path_factory, shared_data):
    """llama-1m exported through the CLI, gpt2-1m through the function; both checked by
    transformers alone in one subprocess. Returns (folders, what transformers computed, job)."""
    tmp = tmp_path_factory.mktemp("exported")
    r = _cli("export", "llama-1m", "--format", "hf", "--out", str(tmp / "llama-1m"))
    assert r.returncode == 0, r.stderr
    export_hf(SHIPPED / "gpt2-1m", tmp / "gpt2-1m")
    g = torch.Generator().manual_seed(0)
    job = {"folders": {n: str(tmp / n) for n in ("llama-1m", "gpt2-1m")},
           "idx": torch.randint(0, 2048, (2, 64), generator=g).tolist(),
           "stories": _stories(shared_data), "prompt": "Once upon a time, there was a", "new": 30}
    (tmp / "job.json").write_text(json.dumps(job))
    (tmp / "check.py").write_text(CHECK)
    r = subprocess.run([sys.executable, "-I", str(tmp / "check.py"), str(tmp / "job.json"),
                        str(tmp / "out.json")], capture_output=True, text=True, cwd=tmp,
                       env={**os.environ, "PYTHONPATH": "", "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return tmp, json.loads((tmp / "out.json").read_text()), job


@pytest.mark.parametrize("name,hf_class", [("llama-1m", "LlamaForCausalLM"),
                                           ("gpt2-1m", "GPT2LMHeadModel")])
def test_hf_export_is_the_same_model_in_transformers_alone(exported, name, hf_class):
    tmp, theirs, job = exported
    got = theirs[name]
    run = load_run(SHIPPED / name)
    assert got["class"] == hf_class
    files = {p.name for p in (tmp / name).iterdir()}
    assert {"config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
            "tokenizer_config.json", "README.md"} <= files
    assert "minlm" not in (tmp / name / "config.json").read_text()  # no custom code to fetch
    assert (tmp / name / "README.md").read_text().startswith("---\nlibrary_name: transformers")
    with torch.no_grad():
        ours = run.model(torch.tensor(job["idx"]))[0]
    hf_logits = torch.load(tmp / f"{name}.logits.pt", weights_only=True)
    assert (ours - hf_logits).abs().max().item() < 1e-4
    # the converted tokenizer: same ids (bos first, as minlm trains) on 100 real stories
    tok = run.tokenizer
    assert len(got["ids"]) == 100
    assert got["ids"] == [tok.encode(s, bos=True) for s in job["stories"]]
    # greedy generation picks the same tokens
    prompt = tok.encode(job["prompt"], bos=True)
    assert got["prompt"] == prompt
    mine = generate_ids(run.model, torch.tensor([prompt]), job["new"], temperature=0,
                        eos_id=tok.eos_id)[0, len(prompt):].tolist()
    assert _until_eos(got["greedy"], tok.eos_id) == _until_eos(mine, tok.eos_id)


def test_chat_run_exports_its_template_and_stops_at_end(tmp_path):
    from transformers import AutoTokenizer, GenerationConfig

    from minlm.chatdata import render_chat

    run = load_run(SHIPPED / "llama-1m-chat")
    out = export_hf(run, tmp_path / "chat")
    hf_tok = AutoTokenizer.from_pretrained(out)
    messages = [{"role": "system", "content": "Be kind."},
                {"role": "user", "content": "Can you tell me a fun fact about dogs?"},
                {"role": "assistant", "content": "Dogs can smell  very well!\n"},
                {"role": "user", "content": "Why?"}]
    theirs = hf_tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    theirs = theirs["input_ids"] if hasattr(theirs, "keys") else theirs
    assert list(theirs) == render_chat(run.tokenizer, messages, add_generation_prompt=True)
    eos = GenerationConfig.from_pretrained(out).eos_token_id
    assert eos == [run.tokenizer.eos_id, run.tokenizer.chat_tokens["end"]]


def test_export_refuses_families_without_a_counterpart(tmp_path):
    r = _cli("export", "matmulfree-1m", "--out", str(tmp_path / "mf"))
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1  # one line
    assert "mixer='mlgru'" in r.stderr and "no counterpart in transformers" in r.stderr
    assert not (tmp_path / "mf").exists()
    with pytest.raises(ValueError, match=r"cannot export moe-1m: n_experts=8 has no counterpart"):
        export_hf(SHIPPED / "moe-1m", tmp_path / "moe")
    with pytest.raises(ValueError, match="GGUF export supports llama-family runs"):
        export_gguf(SHIPPED / "gpt2-1m", tmp_path / "gpt2.gguf")
    assert not list(tmp_path.iterdir())


def test_export_will_not_overwrite_unasked(tmp_path):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_hf(SHIPPED / "llama-1m", tmp_path / "out")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"


# --- GGUF ----------------------------------------------------------------------------------

def _expected_gguf(model) -> dict[str, torch.Tensor]:
    """What llama.cpp expects, written out by hand from its tensor names (q/k de-interleaved
    by the test before comparing)."""
    want = {"token_embd.weight": model.embed.weight, "output_norm.weight": model.norm.weight,
            "output.weight": model.head.weight}
    for i, b in enumerate(model.blocks):
        want.update({f"blk.{i}.attn_norm.weight": b.norm1.weight,
                     f"blk.{i}.ffn_norm.weight": b.norm2.weight,
                     f"blk.{i}.attn_q.weight": b.mixer.q_proj.weight,
                     f"blk.{i}.attn_k.weight": b.mixer.k_proj.weight,
                     f"blk.{i}.attn_v.weight": b.mixer.v_proj.weight,
                     f"blk.{i}.attn_output.weight": b.mixer.o_proj.weight,
                     f"blk.{i}.ffn_gate.weight": b.mlp.gate.weight,
                     f"blk.{i}.ffn_up.weight": b.mlp.up.weight,
                     f"blk.{i}.ffn_down.weight": b.mlp.down.weight})
    return {k: v.detach() for k, v in want.items()}


@pytest.mark.parametrize("dtype", ["f32", "f16", "q8_0"])
def test_gguf_round_trip_gives_identical_tensors_and_vocabulary(tmp_path, dtype):
    gguf = pytest.importorskip("gguf")
    run = load_run(SHIPPED / "llama-1m")
    path = export_gguf(run, tmp_path / "m.gguf", dtype=dtype)
    reader = gguf.GGUFReader(path)
    cfg = run.model_config
    heads = {"attn_q": cfg.n_heads, "attn_k": cfg.kv_heads}
    want = _expected_gguf(run.model)
    q8 = gguf.GGMLQuantizationType.Q8_0
    got = {t.name: torch.from_numpy(gguf.quants.dequantize(t.data, q8) if t.tensor_type == q8
                                    else t.data.copy()) for t in reader.tensors}
    kinds = {t.name: t.tensor_type for t in reader.tensors}
    assert set(got) == set(want)
    for name, w in want.items():
        g = got[name]
        kind = name.split(".")[-2]
        if kind in heads:
            g = rope_deinterleave(g, heads[kind])
        if dtype == "q8_0" and w.dim() == 2:
            # each block of 32 is int8 times one f16 scale (max/127): error within half a step
            assert kinds[name] == q8, name
            step = w.reshape(-1, 32).abs().amax(1, keepdim=True) / 127
            err = (g - w).reshape(-1, 32).abs()
            assert (err <= 0.55 * step + 1e-8).all(), name
            continue
        w = w.half() if dtype == "f16" and w.dim() == 2 else w
        assert g.dtype == w.dtype and torch.equal(g, w), name
    field = lambda key: reader.fields[key].contents()  # noqa: E731
    assert field("general.architecture") == "llama"
    assert field("llama.block_count") == cfg.n_layers
    assert field("llama.attention.head_count_kv") == cfg.kv_heads
    tok = run.tokenizer
    assert field("tokenizer.ggml.tokens") == [tok.id_to_piece(i) for i in range(tok.vocab_size)]
    assert field("tokenizer.ggml.bos_token_id") == tok.bos_id
    assert field("tokenizer.ggml.add_space_prefix") is False


def test_transformers_loads_the_gguf_file_with_the_same_logits(tmp_path):
    pytest.importorskip("gguf")
    pytest.importorskip("accelerate", reason="transformers needs accelerate to read GGUF")
    from transformers import AutoModelForCausalLM

    run = load_run(SHIPPED / "llama-1m")
    r = _cli("export", "llama-1m", "--format", "gguf", "--dtype", "f32", "--out",
             str(tmp_path / "llama-1m.gguf"))
    assert r.returncode == 0, r.stderr
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file="llama-1m.gguf",
                                              dtype=torch.float32).eval()
    idx = torch.randint(0, 2048, (2, 64))
    with torch.no_grad():
        assert (hf(idx).logits - run.model(idx)[0]).abs().max().item() < 1e-3


# --- import --------------------------------------------------------------------------------

def _saved_by_transformers(folder: Path, hf_model, seed: int = 0) -> Path:
    """A tiny Hugging Face checkpoint written by transformers itself: weights moved off their
    init (norm gains of exactly 1 hide bugs), minlm's TinyStories tokenizer converted."""
    from minlm.export import hf_tokenizer
    from minlm.tokenizer import load_tokenizer

    torch.manual_seed(seed)
    with torch.no_grad():
        for p in hf_model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    hf_model.eval().save_pretrained(folder)
    hf_tokenizer(load_tokenizer("tinystories-2048")).save_pretrained(folder)
    return folder


def _tiny_llama(**kw):
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        vocab_size=2048, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        rope_theta=500.0, tie_word_embeddings=False, **kw))


def _tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(vocab_size=2048, n_embd=64, n_layer=2, n_head=4,
                                      n_positions=128, bos_token_id=2, eos_token_id=3))


def test_imported_llama_gives_the_same_logits_then_fine_tunes(tmp_path, shared_data):
    from minlm.finetune import sft

    hf = _tiny_llama()
    src = _saved_by_transformers(tmp_path / "tiny-llama", hf)
    runs_dir = tmp_path / "runs"
    r = _cli("import", str(src), "--name", "imported", runs_dir=runs_dir)
    assert r.returncode == 0, r.stderr
    run = load_run("imported", runs_dir=runs_dir)
    assert run.meta["kind"] == "import" and run.model_config.rope_theta == 500.0
    idx = torch.randint(0, 2048, (2, 48))
    with torch.no_grad():
        assert (run.model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-5
    r = _cli("trace", "--run", "imported", "--depth", "2", "--no-stats", runs_dir=runs_dir)
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith("imported: 348,480 parameters") and "blocks.1" in r.stdout
    text = generate(run.model, run.tokenizer, "Once upon a time", 5, temperature=0)
    assert len(run.tokenizer.encode(text)) >= 1
    result = sft(run.path, shared_data / "chat" / "hh_rlhf_helpful_sft.jsonl", max_steps=5,
                 max_examples=40, batch_size=4, val_fraction=0.0, verbose=False,
                 device="cpu")
    assert result.step == 5
    tuned = load_run(result.run_dir)
    assert tuned.meta["parent"]
    assert not torch.equal(tuned.model.embed.weight, run.model.embed.weight)


def test_imported_gpt2_gives_the_same_logits(tmp_path, monkeypatch):
    import huggingface_hub

    from minlm.hub_import import import_checkpoint

    hf = _tiny_gpt2()
    src = _saved_by_transformers(tmp_path / "tiny-gpt2", hf)
    asked = {}

    def snapshot_download(repo_id, allow_patterns):  # the Hub, without the network
        asked.update(repo_id=repo_id, allow_patterns=allow_patterns)
        return str(src)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    run = load_run(import_checkpoint("hf:someone/tiny-gpt2", runs_dir=tmp_path / "runs"))
    assert asked["repo_id"] == "someone/tiny-gpt2"
    assert "*.safetensors" in asked["allow_patterns"] and "*.bin" not in asked["allow_patterns"]
    assert run.name == "tiny-gpt2" and run.meta["imported_from"] == "hf:someone/tiny-gpt2"
    idx = torch.randint(0, 2048, (2, 48))
    with torch.no_grad():
        assert (run.model(idx)[0] - hf(idx).logits).abs().max().item() < 1e-5
    # and back out again: an imported run (a tokenizer.json tokenizer) exports like any run
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = export_hf(run, tmp_path / "back")
    again, again_tok = AutoModelForCausalLM.from_pretrained(out), AutoTokenizer.from_pretrained(out)
    with torch.no_grad():
        assert (again(idx).logits - hf(idx).logits).abs().max().item() < 1e-5
    text = "Tom said, \"Look!  123 dogs.\"\n<|user|>hi<|end|>"
    assert again_tok(text).input_ids == run.tokenizer.encode(text, bos=True)
    with pytest.raises(ValueError, match="run 'tiny-gpt2' already exists .* --overwrite"):
        import_checkpoint(src, runs_dir=tmp_path / "runs")


def test_import_refuses_what_minlm_would_compute_differently(tmp_path):
    from minlm.hub_import import import_checkpoint

    src = _saved_by_transformers(tmp_path / "biased", _tiny_llama(attention_bias=True))
    with pytest.raises(ValueError, match=r"attention_bias=True has no counterpart in minlm"):
        import_checkpoint(src, runs_dir=tmp_path / "runs")
    assert not (tmp_path / "runs").exists()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        import_checkpoint(tmp_path, runs_dir=tmp_path / "runs")
    with pytest.raises(ValueError, match="a Hub source is hf:owner/name"):
        import_checkpoint("hf:no-owner", runs_dir=tmp_path / "runs")


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    assert done.returncode == 2, done.stdout + done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    return lines[0]


def test_import_refuses_a_checkpoint_with_missing_or_unexpected_tensors(tmp_path):
    """Was: exit 0 with layer 0's down projection randomly initialised by transformers."""
    from safetensors.torch import load_file, save_file

    src = _saved_by_transformers(tmp_path / "holed", _tiny_llama())
    weights = src / "model.safetensors"
    full = load_file(weights)
    holed = {k: v for k, v in full.items() if k != "model.layers.0.mlp.down_proj.weight"}
    save_file(holed, weights, metadata={"format": "pt"})
    runs_dir = tmp_path / "runs"
    line = _one_error_line(_cli("import", str(src), "--name", "holed", runs_dir=runs_dir))
    assert "missing tensors model.layers.0.mlp.down_proj.weight" in line
    save_file({**full, "model.layers.0.mlp.extra.weight": full["model.norm.weight"].clone()},
              weights,
              metadata={"format": "pt"})
    line = _one_error_line(_cli("import", str(src), "--name", "extra", runs_dir=runs_dir))
    assert "unexpected tensors model.layers.0.mlp.extra.weight" in line
    assert not runs_dir.exists()


def test_import_refuses_pickled_weights_in_one_line_without_loading_them(tmp_path):
    """A pytorch_model.bin whose pickle would run a command when loaded: refused by what it
    is, never opened (was: torch's multi-line weights_only advice)."""
    import pickle

    src = _saved_by_transformers(tmp_path / "pickled", _tiny_llama())
    (src / "model.safetensors").unlink()
    pwned = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {pwned}",))

    (src / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    line = _one_error_line(_cli("import", str(src), "--name", "p", runs_dir=tmp_path / "runs"))
    assert "only pickled weights (pytorch_model.bin)" in line and "safetensors" in line
    assert "weights_only" not in line
    assert not pwned.exists() and not (tmp_path / "runs").exists()


# --- tracing someone else's model ----------------------------------------------------------

def test_trace_of_a_transformers_model_shows_the_same_shapes_as_minlm():
    """Notebook 5's last section: minlm's tracer on transformers' Llama built from a config."""
    from transformers import LlamaForCausalLM

    from minlm import LM
    from minlm.interop import hf_config
    from minlm.tracing import trace

    ours = LM.from_preset("llama-1m").eval()
    theirs = LlamaForCausalLM(hf_config(ours.config)).eval()
    idx = torch.randint(0, ours.config.vocab_size, (2, 16))
    with trace(theirs) as t, torch.no_grad():
        theirs(idx)
    mine = ours.trace(idx)
    assert t.rows[0].module == "LlamaForCausalLM" and t.rows[0].params == ours.num_params()
    pairs = {"self_attn.q_proj": "mixer.q_proj", "self_attn.k_proj": "mixer.k_proj",
             "self_attn.o_proj": "mixer.o_proj", "mlp.gate_proj": "mlp.gate",
             "mlp.down_proj": "mlp.down", "lm_head": "head"}
    for hf_path, our_path in pairs.items():
        hf_rows, our_rows = t.find(hf_path), mine.find(our_path)
        assert len(hf_rows) == len(our_rows) > 0, hf_path
        assert [r.out_shapes for r in hf_rows] == [r.out_shapes for r in our_rows], hf_path
