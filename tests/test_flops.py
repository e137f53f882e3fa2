"""MFU inputs: FLOPs per token by hand, and a CPU peak probe that leaves no trace."""

import pytest
import torch

from minlm.config import ModelConfig
from minlm.flops import cpu_peak_flops, flops_per_token


def test_flops_per_token_by_hand():
    cfg = ModelConfig(vocab_size=64, dim=16, n_layers=2, n_heads=2, n_kv_heads=2, block_size=8,
                      position="rope", tie_embeddings=True, activation="gelu", hidden_dim=64,
                      norm="rmsnorm")
    per_layer = 4 * 16 * 16 + 2 * 16 * 64  # q, k, v, o and the two MLP matrices
    matmul = 2 * per_layer + 64 * 16        # plus the tied head
    assert flops_per_token(cfg, matmul) == 6 * matmul + 12 * 2 * 2 * 8 * 8


def test_cpu_probe_leaves_global_rng_alone(tmp_path, monkeypatch):
    """Regression: the probe drew from the global RNG, so a run that measured the peak drew
    different dropout masks from a resumed one that read it from the cache."""
    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path))
    torch.manual_seed(0)
    before = torch.get_rng_state()
    peak = cpu_peak_flops(seconds=0.01)
    assert torch.equal(torch.get_rng_state(), before)
    assert peak > 0
    assert cpu_peak_flops(seconds=0.01) == peak  # second call is the cached figure
    assert (tmp_path / "peak_flops.json").exists()


@pytest.mark.parametrize("bf16, fp32, expected", [(300e9, 100e9, True), (1e9, 140e9, False),
                                                  (110e9, 100e9, False)])
def test_auto_precision_on_cpu_follows_the_probe(monkeypatch, bf16, fp32, expected):
    """bf16 is 3x faster on some CPUs and 100x slower on AVX2-only ones: auto must measure."""
    from minlm import flops
    from minlm.train import use_bf16

    monkeypatch.setattr(flops, "cpu_peak_flops", lambda dtype=torch.float32, **_: bf16 if dtype == torch.bfloat16 else fp32)
    assert use_bf16("auto", torch.device("cpu")) is expected
    assert use_bf16("bf16", torch.device("cpu")) and not use_bf16("fp32", torch.device("cpu"))
