"""Seed groups, comparisons on a fair axis, and verdicts that weigh a gap against the seeds'
spread."""

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from minlm import ModelConfig, TrainConfig
from minlm.evaluate import compare, judge
from minlm.flops import flops_per_token
from minlm.runs import read_configs
from minlm.seeds import curve_at, verdict
from minlm.train import seed_configs

REPO = Path(__file__).resolve().parents[1]


def _env(shared_data, tmp_path):
    return {**os.environ, "PYTHONPATH": str(REPO), "MINLM_DATA_DIR": str(shared_data),
            "MINLM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _minlm(args, shared_data, tmp_path, timeout=600):
    return subprocess.run([sys.executable, "-m", "minlm", *args], env=_env(shared_data, tmp_path),
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path,
                          check=False)


TINY = ["vocab_size=512", "dim=32", "n_layers=1", "n_heads=2", "n_kv_heads=1", "block_size=32",
        "max_iters=8", "eval_interval=4", "eval_iters=2", "log_interval=4", "max_docs=200",
        "num_workers=1", "verbose=false"]


def test_seed_configs_are_siblings_of_one_group():
    cfgs = seed_configs(TrainConfig(run_name="r", seed=7), 3)
    assert [(c.run_name, c.seed, c.group) for c in cfgs] == [("r-s0", 7, "r"), ("r-s1", 8, "r"),
                                                             ("r-s2", 9, "r")]
    with pytest.raises(ValueError, match="seeds=0 is invalid: must be a whole number >= 1"):
        seed_configs(TrainConfig(run_name="r"), 0)


def test_train_seeds_makes_a_group_that_compare_shows_as_one_band(tmp_path, shared_data):
    out = tmp_path / "runs"
    for name, batch in (("a", 4), ("b", 8)):
        done = _minlm(["train", *TINY, f"batch_size={batch}", f"out_dir={out}",
                       f"run_name={name}", "seeds=2"], shared_data, tmp_path)
        assert done.returncode == 0, done.stdout + done.stderr
        assert f"group {name}: 2 seeds in {out}" in done.stdout
    for i in range(2):
        saved = read_configs(out / f"a-s{i}")[1]
        assert (saved.run_name, saved.seed, saved.group) == (f"a-s{i}", 1337 + i, "a")

    shown = _minlm(["compare", str(out / "a"), str(out / "b"), "--out", str(tmp_path / "c.png")],
                   shared_data, tmp_path)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    lines = shown.stdout.splitlines()
    assert lines[0].split()[:2] == ["run", "seeds"]
    assert [ln.split()[:2] for ln in lines[1:3]] == [["a", "2"], ["b", "2"]]
    assert "note: these runs differ in batch size (4, 8); the x axis is tokens seen" in shown.stdout
    # judged where both reached: a's 8 steps of 4 x 32 tokens
    assert "at 1,024 tokens (each run's curve interpolated there):" in shown.stdout
    verdict_line = next(ln for ln in lines if "seeds each at 1,024 tokens" in ln)
    assert "Welch's t-test over seeds, p=" in verdict_line

    table, fig = compare([out / "a", out / "b"])  # tokens by default
    assert list(table["seeds"]) == [2, 2] and table["val_bpb_sd"].notna().all()
    ax = fig.axes[0]
    assert ax.get_xlabel() == "tokens seen"
    assert [ln.get_label() for ln in ax.get_lines()] == ["a (mean of 2 seeds)",
                                                       "b (mean of 2 seeds)"]
    assert len(ax.collections) == 2  # one band per group
    assert "batch size" in ax.get_title()
    # the members given one by one are grouped by their recorded group as well
    one_by_one, _ = compare([out / "a-s0", out / "a-s1"])
    assert list(one_by_one["run"]) == ["a"] and list(one_by_one["seeds"]) == [2]


def test_compare_plots_tokens_by_default_and_flops_from_the_flops_module(tmp_path):
    from minlm import runs

    cfg = ModelConfig.from_preset("llama-1m", vocab_size=512, dim=32, n_layers=1, n_heads=2,
                                  n_kv_heads=1, block_size=32)
    run = tmp_path / "r"
    run.mkdir()
    runs.save_configs(run, cfg, TrainConfig(batch_size=4), meta={"params": 1})
    runs.write_log(run, [{"step": s, "tokens": 128 * s, "elapsed_s": s, "val_loss": 5.0 - s,
                          "val_bpb": 2.0 - s / 10} for s in (1, 2, 3)])
    _, fig = compare([run])
    assert list(fig.axes[0].get_lines()[0].get_xdata()) == [128, 256, 384]
    _, fig = compare([run], x="flops")
    assert fig.axes[0].get_xlabel() == "training compute (FLOPs)"
    assert np.allclose(fig.axes[0].get_lines()[0].get_xdata(),
                       flops_per_token(cfg) * np.array([128, 256, 384]))
    with pytest.raises(ValueError, match="x='steps' is invalid: use one of tokens, flops, time"):
        compare([run], x="steps")


def test_cli_compare_of_shipped_runs_uses_tokens_and_names_the_vocabulary_gap(tmp_path,
                                                                               shared_data):
    models = REPO / "trained_models"
    shown = _minlm(["compare", str(models / "llama-1m"), str(models / "gpt2-1m"), "--out",
                    str(tmp_path / "zoo.png")], shared_data, tmp_path)
    assert shown.returncode == 0, shown.stdout + shown.stderr
    assert ("note: these runs differ in vocabulary (2048, 4096); the x axis is tokens seen, and "
            "bits per byte compare across tokenizers") in shown.stdout
    assert "Welch" not in shown.stdout  # single runs: no verdict to give
    stepped = _minlm(["compare", str(models / "llama-1m"), str(models / "gpt2-1m"), "--x",
                      "step", "--out", str(tmp_path / "zoo.png")], shared_data, tmp_path)
    assert "the x axis is steps, which do not compare across batch sizes" in stepped.stdout


# --- verdicts on synthetic curves of known spread ---------------------------------------------

SPREAD = 0.004  # sd of a seed's final offset, as measured between seeds at ~1M parameters


def _synthetic_group(base: Path, name: str, shift: float, rng, seeds: int = 4):
    """Seed runs of a made-up recipe: bpb = 2.5 - tokens / 10^4 + shift + a per-seed offset
    of sd SPREAD (+ small per-evaluation noise), each seed evaluated at its own token counts,
    so the verdict must interpolate (exactly, on a straight line)."""
    from minlm import runs

    cfg = ModelConfig.from_preset("llama-1m", vocab_size=512, dim=32, n_layers=1, n_heads=2,
                                  n_kv_heads=1, block_size=32)
    for k in range(seeds):
        run = base / f"{name}-s{k}"
        run.mkdir(parents=True)
        runs.save_configs(run, cfg, TrainConfig(run_name=run.name, seed=k, group=name),
                          meta={"params": 1})
        offset = rng.normal(0, SPREAD)
        tokens = np.sort(rng.choice(np.arange(100, 12000), 9, replace=False)).tolist() + [12800]
        rows = [{"step": i, "tokens": t, "elapsed_s": i, "val_loss": 1.0,
                 "val_bpb": 2.5 - t / 1e4 + shift + offset + rng.normal(0, 1e-4)}
                for i, t in enumerate(tokens)]
        runs.write_log(run, rows)


def test_verdict_finds_a_real_difference_and_not_a_null_one(tmp_path):
    rng = np.random.default_rng(0)
    _synthetic_group(tmp_path, "base", 0.0, rng)
    _synthetic_group(tmp_path, "same", 0.0, rng)  # the same recipe again: no real difference
    _synthetic_group(tmp_path, "better", -0.02, rng)  # five times the seed spread lower
    table = judge([tmp_path / "base", tmp_path / "same", tmp_path / "better"])
    by = {(r.a, r.b): r for r in table.itertuples()}
    assert set(table["tokens"]) == {12800}
    null, real = by[("base", "same")], by[("base", "better")]
    assert null.p > 0.05 and "within noise (Welch's t-test over seeds" in null.verdict
    assert real.p < 0.01 and real.diff == pytest.approx(0.02, abs=3 * real.stderr)
    assert real.verdict.startswith("better is lower than base by 0.0")
    assert "over 4 seeds each at 12,800 tokens; larger than the seed spread" in real.verdict
    # at an earlier point the curves are read by interpolation, every seed at the same tokens
    early = judge([tmp_path / "base", tmp_path / "better"], at_tokens=6000)
    assert early["tokens"][0] == 6000 and early["p"][0] < 0.01
    with pytest.raises(ValueError, match="at_tokens=20000 is beyond the 12,800 tokens"):
        judge([tmp_path / "base", tmp_path / "better"], at_tokens=20000)


def test_verdict_needs_two_seeds_a_side_to_judge():
    v = verdict([0.90], [0.95], ("a", "b"), at=1000)
    assert math.isnan(v.p) and "no seed spread to judge by" in v.text
    assert curve_at([0, 10], [1.0, 2.0], [5, 11]).tolist()[0] == 1.5
    assert math.isnan(curve_at([0, 10], [1.0, 2.0], [11])[0])


def test_search_trains_each_candidate_over_seeds_as_a_group(tmp_path, shared_data,
                                                             monkeypatch):
    from minlm.search import grid, search

    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path / "cache"))
    model = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=1, n_heads=2,
                                    n_kv_heads=1, block_size=32)
    train = TrainConfig(out_dir=str(tmp_path), max_iters=4, batch_size=4, warmup_iters=1,
                        eval_interval=2, eval_iters=1, log_interval=2, max_docs=200,
                        num_workers=1, verbose=False, seed=5)
    result = search(grid(lr=[3e-3, 1e-3]), model, train, n_rungs=1, seeds=2, verbose=False)
    assert sorted(t.name for t in result.trials) == ["trial00-lr=0.003-s0", "trial00-lr=0.003-s1",
                                                     "trial01-lr=0.001-s0", "trial01-lr=0.001-s1"]
    assert {(t.overrides["group"], t.overrides["seed"]) for t in result.trials} == {
        ("trial00-lr=0.003", 5), ("trial00-lr=0.003", 6), ("trial01-lr=0.001", 5),
        ("trial01-lr=0.001", 6)}
    table, _ = compare([tmp_path / "search" / "trial00-lr=0.003", tmp_path / "search" /
                        "trial01-lr=0.001"])
    assert list(table["seeds"]) == [2, 2]
    with pytest.raises(ValueError, match="seeds=2 sets each trial's seed and group"):
        search(grid(seed=[1, 2]), model, train, n_rungs=1, seeds=2, name="other")


def test_judge_refuses_a_run_without_evaluations_and_a_single_group(tmp_path):
    rng = np.random.default_rng(1)
    _synthetic_group(tmp_path, "base", 0.0, rng, seeds=2)
    from minlm import runs

    bare = tmp_path / "bare"
    bare.mkdir()
    cfg = ModelConfig.from_preset("llama-1m", vocab_size=512, dim=32, n_layers=1, n_heads=2,
                                  n_kv_heads=1, block_size=32)
    runs.save_configs(bare, cfg, TrainConfig(), meta={"params": 1})
    runs.write_log(bare, [{"step": 1, "tokens": 10, "elapsed_s": 1, "train_loss": 5.0}])
    with pytest.raises(ValueError, match="run bare has no evaluation in its log.csv yet"):
        judge([tmp_path / "base", bare])
    with pytest.raises(ValueError, match="judge needs at least two groups of runs to compare; got base"):
        judge([tmp_path / "base"])
