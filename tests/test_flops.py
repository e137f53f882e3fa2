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


def _cache(tmp_path, threads: int, flops: float, dtype=torch.float32) -> None:
    """A cached peak as an earlier session left it (a plain figure, the old format)."""
    import json
    import platform

    key = f"{platform.node()}|{platform.processor()}|{threads}|{dtype}"
    (tmp_path / "peak_flops.json").write_text(json.dumps({key: flops}))


def test_an_implausible_cached_peak_is_not_trusted(tmp_path, monkeypatch, shard_cache):
    """Regression: a peak cached while the machine was busy was trusted as it was, and the
    log said MFU 4.42. A run that sees MFU > 1 probes again, never logs MFU above 1, and
    records which peak it used."""
    import json

    from minlm import TrainConfig
    from minlm.runs import read_configs, read_log
    from minlm.train import train

    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path))
    _cache(tmp_path, torch.get_num_threads(), 1e3)  # 1 kFLOP/s: far below any CPU
    model_cfg = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=2,
                                        n_heads=2, n_kv_heads=1, block_size=32)
    cfg = TrainConfig(run_name="mfu", out_dir=str(tmp_path / "runs"), max_iters=8, batch_size=4,
                      eval_interval=8, eval_iters=1, log_interval=2, max_docs=200, verbose=False)
    result = train(model_cfg, cfg)
    mfu = read_log(result.run_dir)["mfu"].dropna()
    assert len(mfu) >= 3 and (mfu <= 1).all() and (mfu > 0).all(), list(mfu)
    peak = read_configs(result.run_dir)[2]["peak_flops"]
    assert "re-measured" in peak["source"] and peak["flops"] > 1e6, peak
    cached = json.loads((tmp_path / "peak_flops.json").read_text())
    assert [v["flops"] for v in cached.values()] == [peak["flops"]]  # the cache is corrected


def test_a_peak_below_what_fewer_threads_reached_is_raised(tmp_path, monkeypatch):
    """More threads cannot be slower at their best: a 2-thread figure below the 1-thread one
    was measured on a busy moment."""
    import json
    import platform

    from minlm.flops import cpu_peak

    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path))
    node = f"{platform.node()}|{platform.processor()}"
    (tmp_path / "peak_flops.json").write_text(json.dumps({
        f"{node}|1|{torch.float32}": 5e15, f"{node}|2|{torch.float32}": 1e3}))
    n = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        peak = cpu_peak()
    finally:
        torch.set_num_threads(n)
    assert peak["flops"] == 5e15 and peak["threads"] == 2 and "fewer threads" in peak["source"]
