import time
from pathlib import Path

import pytest
import torch
from torch import nn

from minlm import LM, ModelConfig, trace
from minlm.tracing import Probe, hook_count

GOLDEN = Path(__file__).parent / "golden" / "trace_tiny_llama.txt"


def tiny_llama() -> LM:
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-1m", vocab_size=64, dim=16, n_layers=2, n_heads=4,
                                  n_kv_heads=2, block_size=8, hidden_dim=24)
    return LM(cfg).eval()


def test_two_layer_llama_rows_in_call_order():
    model = tiny_llama()
    idx = torch.randint(0, 64, (2, 8))
    with trace(model) as t:
        model(idx)
    paths = [r.path for r in t.rows]
    block0 = [p for p in paths if p.startswith("blocks.0.")]
    expected_order = ["blocks.0.norm1", "blocks.0.mixer.q_proj", "blocks.0.mixer.q_heads",
                      "blocks.0.mixer.k_proj", "blocks.0.mixer.k_heads", "blocks.0.mixer.v_proj",
                      "blocks.0.mixer.v_heads", "blocks.0.mixer.scores", "blocks.0.mixer.probs",
                      "blocks.0.mixer.o_proj", "blocks.0.norm2", "blocks.0.mlp"]
    positions = [block0.index(p) for p in expected_order]
    assert positions == sorted(positions)
    shapes = {r.path: r.out_shapes[0] for r in t.rows}
    assert shapes["blocks.1.mixer.q_proj"] == (2, 8, 16)
    assert shapes["blocks.1.mixer.q_heads"] == (2, 4, 8, 4)  # (B, H, T, D)
    assert shapes["blocks.1.mixer.k_heads"] == (2, 2, 8, 4)  # (B, K, T, D): grouped-query
    assert shapes["blocks.1.mixer.scores"] == (2, 4, 8, 8)  # (B, H, T, S)
    assert shapes["blocks.1"] == (2, 8, 16)
    assert shapes[""] == (2, 8, 64)
    # the default block is PreNormBlock, whose residual adds are plain `+` in its forward
    assert {r.module for r in t.rows if r.depth == 1 and r.path.startswith("blocks.")} \
        == {"PreNormBlock"}
    # the whole model's FLOPs include every linear layer
    linear = sum(r.flops for r in t.rows if r.module == "Linear")
    assert t.rows[0].flops >= linear > 0


def test_tracing_off_leaves_no_hooks_and_restores_mode():
    model = tiny_llama()
    model.train()
    assert hook_count(model) == 0
    with trace(model):
        assert hook_count(model) > 0
        model(torch.zeros(1, 4, dtype=torch.long))
    assert hook_count(model) == 0 and model.training
    with pytest.raises(IndexError), trace(model):  # hooks go even when the forward fails
        model(torch.full((1, 4), 10_000))
    assert hook_count(model) == 0


def test_trace_does_not_change_outputs():
    model = tiny_llama()
    idx = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        plain = model(idx)[0]
        with trace(model):
            traced = model(idx)[0]
    assert torch.allclose(plain, traced, atol=1e-6)


def test_plain_and_third_party_modules_are_traced():
    seq = nn.Sequential(nn.Linear(4, 8), nn.GELU(), nn.Linear(8, 2))
    with trace(seq) as t:
        seq(torch.randn(3, 4))
    assert [r.path for r in t.rows] == ["", "0", "1", "2"]
    assert t.rows[1].flops == 2 * 3 * 4 * 8
    df = t.to_pandas()
    assert list(df["module"]) == ["Sequential", "Linear", "GELU", "Linear"]
    assert df.loc[3, "out_shapes"] == [(3, 2)]


def test_probe_capture_keeps_attention_probabilities():
    model = tiny_llama()
    t = model.trace(torch.randint(0, 64, (1, 8)), capture=["mixer.probs"])
    probs = t.tensors["blocks.0.mixer.probs"]
    assert probs.shape == (1, 4, 8, 8)
    assert torch.allclose(probs.sum(-1), torch.ones(1, 4, 8), atol=1e-5)
    assert torch.all(probs.triu(1) == 0)  # causal


def test_trace_of_compiled_model_traces_original():
    model = tiny_llama()
    compiled = torch.compile(model)
    with trace(compiled) as t:
        model(torch.randint(0, 64, (1, 8)))
    assert t.rows and t.rows[0].module == "LM"
    assert hook_count(model) == 0


def test_golden_trace():
    """The tree of a tiny fixed model, without the value statistics, is checked in."""
    model = tiny_llama()
    t = model.trace(torch.zeros(2, 8, dtype=torch.long))
    text = t.format(stats=False) + "\n"
    if not GOLDEN.exists():  # first run writes it; commit it
        GOLDEN.write_text(text)
    assert text == GOLDEN.read_text()


def test_trace_of_1m_llama_is_fast_and_readable():
    model = LM.from_preset("llama-1m")
    idx = torch.randint(0, 2048, (1, 64))
    start = time.perf_counter()
    text = str(model.trace(idx))
    elapsed = time.perf_counter() - start
    assert elapsed < 2.0, elapsed
    assert "q_heads" in text and "(1, 4, 64, 32)" in text
