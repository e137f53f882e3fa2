"""Evaluation over whole texts (loss, perplexity, bits per byte, top-k accuracy) checked by
hand, run comparison (table, curves, side-by-side samples), and the eval/compare commands."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from minlm import LM, ModelConfig, TrainConfig
from minlm.cli import main
from minlm.evaluate import (
    EvalResult,
    compare,
    evaluate_file,
    evaluate_text,
    evaluate_tokens,
    side_by_side,
    topk_accuracy,
)
from minlm.tokenizer import load_tokenizer

DOCS = ["Once upon a time, there was a little cat named Tom.",
        "Tom liked to play with a red ball. One day the ball rolled away — très loin!"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tinystories-512")


def tiny(vocab_size: int = 512, **overrides) -> LM:
    torch.manual_seed(0)
    base = dict(vocab_size=vocab_size, block_size=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    model = LM(ModelConfig.from_preset("llama-1m", **{**base, **overrides})).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def test_bits_per_byte_of_a_uniform_model_is_log2_vocab_per_token(tok):
    """All-zero weights give equal logits: every target costs exactly ln V nats."""
    model = tiny()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    ids = [i for d in DOCS for i in tok.encode(d, bos=True, eos=True)]
    n_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    result = evaluate_text(model, tok, DOCS)
    assert result.targets == len(ids) - 1 and result.n_bytes == n_bytes and n_bytes > len(DOCS[1])
    assert result.loss == pytest.approx(math.log(512), rel=1e-6)
    assert result.perplexity == pytest.approx(512, rel=1e-5)
    assert result.bits_per_byte == pytest.approx((len(ids) - 1) * 9 / n_bytes, rel=1e-6)


def test_bits_per_byte_equals_the_hand_computation(tok):
    """Windows of 16 tokens, batches of 3 (a tail window too) against one window at a time."""
    model = tiny()
    ids = torch.tensor([i for d in DOCS for i in tok.encode(d, bos=True, eos=True)])
    n_bytes = sum(len(d.encode("utf-8")) for d in DOCS)
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(ids) - 1, 16):
            x = ids[start:start + 16]
            y = ids[start + 1:start + 17]
            x = x[:len(y)]
            logp = F.log_softmax(model(x[None])[0][0], dim=-1)  # (T, V)
            total -= logp[torch.arange(len(y)), y].sum().item()
            count += len(y)
    assert count == len(ids) - 1 and count % 16  # a tail window is in the stream
    result = evaluate_text(model, tok, DOCS, batch_size=3)
    assert result.loss == pytest.approx(total / count, rel=1e-5)
    assert result.bits_per_byte == pytest.approx(total / n_bytes / math.log(2), rel=1e-5)
    assert result.documents == 2


def test_teacher_forcing_accuracy_of_a_copying_model_is_one():
    """A model forced to copy: the embedding is one-hot, the blocks add nothing, and the head
    maps token i to i+1 (mod V); on the stream 0, 1, 2, ... every next token is predicted."""
    V = 16
    model = tiny(vocab_size=V, dim=V, n_heads=2, n_kv_heads=1, tie_embeddings=False,
                 hidden_dim=32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down.weight")):
                p.zero_()  # the residual stream stays the token's own embedding
            elif name.endswith(("norm1.weight", "norm2.weight")) or name == "norm.weight":
                p.fill_(1.0)
        model.embed.weight.copy_(torch.eye(V) * 3)
        model.head.weight.copy_(torch.roll(torch.eye(V), 1, dims=0))  # row j picks token j-1
    stream = np.arange(200) % V
    acc = topk_accuracy(model, stream, ks=(1, 5, 10), batch_size=4)
    assert acc == {1: 1.0, 5: 1.0, 10: 1.0}
    shuffled = np.random.default_rng(0).integers(0, V, 200)
    low = topk_accuracy(model, shuffled)
    assert low[1] < 0.3 and low[1] <= low[5] <= low[10] <= 1.0


def test_topk_accuracy_in_batches_equals_brute_force():
    model = tiny(vocab_size=64)
    stream = np.random.default_rng(1).integers(0, 64, 101)
    hits = {1: 0, 5: 0, 10: 0}
    with torch.no_grad():
        for start in range(0, 100, 16):
            x = torch.as_tensor(stream[start:start + 16])
            y = torch.as_tensor(stream[start + 1:start + 17])
            logits = model(x[:len(y)][None])[0][0]
            for t, target in enumerate(y.tolist()):
                order = logits[t].argsort(descending=True).tolist()
                for k in hits:
                    hits[k] += target in order[:k]
    acc = topk_accuracy(model, stream, batch_size=2)
    assert acc == {k: pytest.approx(v / 100) for k, v in hits.items()}
    assert evaluate_tokens(model, torch.as_tensor(stream)).accuracy == acc  # tensors too


def test_bad_evaluation_inputs_are_refused():
    model = tiny(vocab_size=64)
    with pytest.raises(ValueError, match="at least 2 token ids"):
        evaluate_tokens(model, np.array([3]))
    with pytest.raises(ValueError, match="ks="):
        evaluate_tokens(model, np.arange(10), ks=(0,))


def test_result_prints_one_labelled_line_each():
    r = EvalResult(loss=1.5, perplexity=math.exp(1.5), bits_per_byte=0.5,
                   accuracy={1: 0.4, 5: 0.7, 10: 0.8}, targets=100, n_bytes=400, documents=3)
    lines = str(r).splitlines()
    assert lines[:6] == ["validation loss: 1.5000 nats/token", "perplexity: 4.482",
                         "bits per byte: 0.5000", "top-1 accuracy: 0.4000",
                         "top-5 accuracy: 0.7000", "top-10 accuracy: 0.8000"]


# --- comparing runs -----------------------------------------------------------------------

def make_run(run_dir, tokenizer, steps=(0, 5, 10), slope=0.1, **overrides):
    """A run folder without training: configs, weights, tokenizer copy and a made-up log."""
    from minlm import runs

    model = tiny(vocab_size=tokenizer.vocab_size, block_size=64, **overrides)
    run_dir.mkdir(parents=True)
    runs.save_configs(run_dir, model.config, TrainConfig(preset="llama-1m"),
                      meta={"tokenizer_hash": tokenizer.hash, "params": model.num_params()})
    runs.save_weights(run_dir, model)
    runs.copy_tokenizer(run_dir, tokenizer)
    rows = []
    for s in steps:
        loss = 5 - slope * s
        rows.append({"step": s, "tokens": 1000 * s, "elapsed_s": 30.0 * s,
                     "train_loss": loss + 0.1})
        rows.append({"step": s, "tokens": 1000 * s, "elapsed_s": 30.0 * s, "val_loss": loss,
                     "val_bpb": loss / math.log(2) / 4})
    runs.write_log(run_dir, rows)
    return run_dir


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, tok):
    base = tmp_path_factory.mktemp("runs")
    return [make_run(base / "fast", tok, slope=0.2),
            make_run(base / "slow", tok, steps=(0, 4, 8, 12), dim=48, n_kv_heads=4)]


def test_compare_returns_final_figures_and_curves(two_runs):
    table, fig = compare([str(p) for p in two_runs], x="tokens")
    assert list(table["run"]) == ["fast", "slow"]
    assert list(table["steps"]) == [10, 12]
    assert table["val_bpb"][0] == pytest.approx(3 / math.log(2) / 4)
    assert table["best_val_bpb"][1] == pytest.approx(table["val_bpb"][1])
    assert table["train_loss"][0] == pytest.approx(3.1)
    assert table["params"][1] > table["params"][0]
    lines = fig.axes[0].get_lines()
    assert [ln.get_label() for ln in lines] == ["fast", "slow"]
    assert list(lines[1].get_xdata()) == [0, 4000, 8000, 12000]
    assert fig.axes[0].get_ylabel() == "validation bits per byte"
    _, fig = compare(two_runs, x="time")
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [0, 2.5, 5.0]  # minutes
    with pytest.raises(ValueError, match="x='wall' is invalid"):
        compare(two_runs, x="wall")


def test_side_by_side_completions(two_runs):
    df = side_by_side(two_runs, ["Once upon a time", "The dog"], max_new_tokens=6,
                      temperature=0.8, seed=1)
    assert df.shape == (2, 2) and list(df.columns) == ["fast", "slow"]
    again = side_by_side(two_runs, ["Once upon a time", "The dog"], max_new_tokens=6,
                         temperature=0.8, seed=1)
    assert df.equals(again)


def test_cli_eval_prints_labelled_figures(two_runs, tmp_path, capsys, shared_data):
    data = shared_data / "tinystories" / "valid.txt"
    assert main(["eval", str(two_runs[0]), "--data", str(data), "--max-docs", "6"]) == 0
    out = capsys.readouterr().out.splitlines()
    labels = [line.split(":")[0] for line in out[1:]]
    assert labels == ["validation loss", "perplexity", "bits per byte", "top-1 accuracy",
                      "top-5 accuracy", "top-10 accuracy", "evaluated"]
    run = __import__("minlm.runs", fromlist=["load_run"]).load_run(two_runs[0])
    direct = evaluate_file(run.model, run.tokenizer, data, max_docs=6)
    assert f"bits per byte: {direct.bits_per_byte:.4f}" in out
    assert main(["eval", str(two_runs[0]), "--data", str(tmp_path / "missing.txt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_compare_writes_the_plot(two_runs, tmp_path, capsys):
    png = tmp_path / "curves.png"
    assert main(["compare", *map(str, two_runs), "--out", str(png), "--x", "time",
                 "--prompt", "Once upon a time", "--max-new-tokens", "5"]) == 0
    out = capsys.readouterr().out
    assert "fast" in out and "slow" in out and "val_bpb" in out and f"wrote {png}" in out
    assert "--- slow: Once upon a time" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["compare", "no-such-run-anywhere"]) == 2
    assert "no run folder" in capsys.readouterr().err


@pytest.mark.parametrize("pick", [["slow"], ["fast", "slow"]])
def test_compare_notebook_figure_has_one_line_per_picked_run(two_runs, pick):
    """The compare notebook's flow: list_runs -> run_picker -> compare(picked paths)."""
    from minlm.runs import list_runs
    from minlm.widgets import run_picker

    runs = list_runs(two_runs[0].parent)
    picker = run_picker(runs, default=pick)
    paths = dict(zip(runs["run"], runs["path"]))
    table, fig = compare([paths[name] for name in picker.value])
    assert sorted(ln.get_label() for ln in fig.axes[0].get_lines()) == sorted(pick)
    assert sorted(table["run"]) == sorted(pick)
