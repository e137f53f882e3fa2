"""The scaling ladder: the shape rule, the power-law fit, and rungs as trials of one study
(resumed after SIGKILL, shared by two processes)."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from minlm import ModelConfig
from minlm.ladder import fit_power_law, parse_sizes, rung_shape
from minlm.model import LM

REPO = Path(__file__).resolve().parents[1]


def test_fit_on_synthetic_power_law_points_recovers_the_exponent():
    rng = np.random.default_rng(0)
    compute = np.geomspace(3e11, 3e14, 5)
    for alpha in (0.15, 0.3, 0.6):
        bpb = 0.7 + 1.5 * (compute / compute[0]) ** -alpha + rng.normal(0, 2e-4, len(compute))
        fit = fit_power_law(compute, bpb)
        assert fit.alpha == pytest.approx(alpha, abs=0.03)
        assert fit.E == pytest.approx(0.7, abs=0.03)
        truth = 0.7 + 1.5 * 10 ** (-3 * alpha) * 10 ** -alpha  # at 10x the largest point
        assert abs(fit.predict(10 * compute[-1]) - truth) < max(0.01, 4 * fit.sd([10 *
                                                                                compute[-1]])[0])
    with pytest.raises(ValueError, match="needs three or more finite points"):
        fit_power_law([1, 2], [1.0, 0.9])


def test_rung_shapes_step_in_heads_keep_width_per_layer_and_land_near_the_target():
    base = ModelConfig.from_preset("llama-1m")  # 4 layers of 128, heads of 32, 2 kv heads of 4
    shapes = [rung_shape(base, t) for t in parse_sizes("0.25M,0.5M,1M,2M")]
    assert [(c.dim, c.n_layers, c.n_heads) for c in shapes] == [(64, 2, 2), (96, 3, 3),
                                                               (128, 4, 4), (160, 5, 5)]
    assert shapes[2] == base  # the base's own size gives the base back
    for c, target in zip(shapes, parse_sizes("0.25M,0.5M,1M,2M")):
        assert 0.8 < LM.count_params(c) / target < 1.2 or target == 2_000_000
    with pytest.raises(ValueError, match="two or more increasing parameter counts"):
        parse_sizes("1M,0.5M")
    with pytest.raises(ValueError, match="'big' is not a parameter count"):
        parse_sizes("big,2M")


# --- rungs as trials: SIGKILL and two processes -----------------------------------------------

BASE = "vocab_size=512 dim=32 n_layers=1 n_heads=2 n_kv_heads=1 block_size=32"
COMMON = ("batch_size=4 lr=3e-3 warmup_iters=2 eval_iters=2 log_interval=2 max_docs=200 "
          "num_workers=1 verbose=false")


def _env(shared_data, tmp_path):
    return {**os.environ, "PYTHONPATH": str(REPO), "MINLM_DATA_DIR": str(shared_data),
            "MINLM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1"}


def _ladder_cmd(out, tokens_per_param="0.3"):
    return [sys.executable, "-m", "minlm", "ladder", *f"preset=gpt2-0.5m {BASE}".split(),
            "--baseline", f"preset=llama-0.5m {BASE}", "--sizes", "30K,80K",
            "--tokens-per-param", tokens_per_param, "--labels", "gpt2,llama", "--name", "lad",
            "--out-dir", str(out), "--train", COMMON, "--heartbeat", "1", "--evals", "2"]


def _study(out):
    import optuna

    return optuna.load_study(study_name="lad", storage=f"sqlite:///{out}/lad/study.db")


def _states(out):
    return {f.user_attrs.get("name", f.params.get("candidate")): f.state
            for f in _study(out).get_trials()}


def test_a_killed_ladder_resumes_without_repeating_finished_rungs(tmp_path, shared_data):
    import optuna

    out = tmp_path / "runs"
    proc = subprocess.Popen(_ladder_cmd(out), env=_env(shared_data, tmp_path), text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = out / "lad" / "gpt2-30K"
    second_log = out / "lad" / "gpt2-80K" / "log.csv"
    deadline = time.time() + 500
    while time.time() < deadline and proc.poll() is None:  # kill inside the second rung
        if (first / "model.safetensors").is_file() and second_log.is_file() and \
                len(second_log.read_text().splitlines()) > 3:
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    finished, stamp = (first / "log.csv").read_text(), (first / "log.csv").stat().st_mtime_ns
    time.sleep(4)  # three silent heartbeats of 1 s: the killed rung's trial is stale

    again = subprocess.run(_ladder_cmd(out), env=_env(shared_data, tmp_path), text=True,
                           capture_output=True, timeout=600, check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert (first / "log.csv").read_text() == finished  # the finished rung was not retrained
    assert (first / "log.csv").stat().st_mtime_ns == stamp
    trials = _study(out).get_trials()
    by = {}
    for f in trials:
        by.setdefault(f.params["candidate"], []).append(f.state)
    done, failed = optuna.trial.TrialState.COMPLETE, optuna.trial.TrialState.FAIL
    assert by == {0: [done], 1: [failed, done], 2: [done], 3: [done]}
    table = (out / "lad" / "ladder.csv").read_text()
    assert table.count(",trained,") == 4
    assert "gpt2: the fit" not in again.stdout  # two rungs per idea: nothing to fit yet
    assert (out / "lad" / "ladder.png").read_bytes()[:4] == b"\x89PNG"


PAIR_SCRIPT = '''
import sys, time
import optuna
from minlm.ladder import ladder

out = sys.argv[1]
held = []

def running():
    study = optuna.load_study(study_name="lad", storage=f"sqlite:///{out}/lad/study.db")
    return sum(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials())

def hold(trial, row):  # hold the first rung until the other process has one too
    if not held:
        deadline = time.time() + 300
        while running() < 2 and time.time() < deadline:
            time.sleep(0.2)
        held.append(running())

base = "''' + BASE + '''".split()
result = ladder(["preset=gpt2-0.5m", *base], ["preset=llama-0.5m", *base], sizes="30K,50K,80K",
                tokens_per_param=0.1, labels=("gpt2", "llama"), name="lad", out_dir=out,
                train="''' + COMMON + '''".split(), evals=1, heartbeat=1, verbose=False,
                callbacks=[hold])
print("statuses", list(result.table["status"]), "held", held, flush=True)
print("fits", list(result.fits["rungs"]), flush=True)
'''


def test_two_processes_split_the_rungs_of_one_ladder(tmp_path, shared_data):
    script = tmp_path / "pair.py"
    script.write_text(PAIR_SCRIPT)
    out = tmp_path / "runs"
    procs = [subprocess.Popen([sys.executable, str(script), str(out)], text=True,
                              env=_env(shared_data, tmp_path), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout + stderr
        assert "statuses ['trained', 'trained', 'trained', 'trained', 'trained', 'trained']" \
            in stdout  # each reads back every rung, whoever trained it
        assert "held [2]" in stdout
        assert "fits [3, 3, 3, 3]" in stdout  # three rungs per idea: fits on both axes
    trials = _study(out).get_trials()
    assert sorted(f.params["candidate"] for f in trials) == list(range(6))  # each rung once
    assert {f.user_attrs["pid"] for f in trials} == {p.pid for p in procs}


def test_a_ladder_over_seeds_fits_the_mean_of_each_rung(tmp_path, shared_data, monkeypatch):
    from minlm.ladder import ladder, read_ladder

    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path / "cache"))
    base = BASE.split()
    result = ladder(["preset=gpt2-0.5m", *base], ["preset=llama-0.5m", *base],
                    sizes="30K,50K,80K", tokens_per_param=0.03, labels=("gpt2", "llama"),
                    out_dir=str(tmp_path), train=COMMON.split(), evals=1, heartbeat=1,
                    seeds=2, verbose=False)
    table = result.table
    assert len(table) == 12 and set(table["status"]) == {"trained"}
    assert sorted(table["seed"].unique()) == [1337, 1338]
    assert sorted(p.name for p in (tmp_path / "ladder").glob("gpt2-30K-s*")) == [
        "gpt2-30K-s0", "gpt2-30K-s1"]
    means = table[table["idea"] == "llama"].groupby("target_params")["val_bpb"].mean()
    fit = result.fits.set_index(["idea", "axis"]).loc[("llama", "compute")]
    assert fit["rungs"] == 3
    assert fit["E"] + fit["A"] == pytest.approx(means.iloc[0], abs=0.05)  # at x0, the first
    again = read_ladder(tmp_path / "ladder")  # as a notebook reads it, with no training
    assert again.fits.equals(result.fits)


def test_the_ladder_names_each_rung_the_time_cap_cut_short(tmp_path, shared_data):
    # 20 tokens a parameter is thousands of steps a rung; 1.2 s of wall clock cuts every one
    cmd = _ladder_cmd(tmp_path / "runs", tokens_per_param="20") + ["--minutes", "0.02"]
    done = subprocess.run(cmd, env=_env(shared_data, tmp_path), text=True, capture_output=True,
                          timeout=600, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "runs" / "lad" / "ladder.csv")
    assert (table["tokens"] < table["budget_tokens"]).all()
    for r in table.itertuples():
        assert (f"{r.idea}-{r.size}: trained {r.tokens:,} of its {r.budget_tokens:,} tokens "
                "before the time cap (--minutes 0.02)") in done.stdout
