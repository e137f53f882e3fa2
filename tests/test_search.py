"""Search: memory budget skips, results ordered by val bits per byte, successive halving."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from minlm import ModelConfig, TrainConfig
from minlm.flops import flops_per_token
from minlm.search import (_rungs, grid, measure_step_memory, parse_bytes, random_candidates,
                          parse_space, search, split_overrides, steps_for_compute)

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module", autouse=True)
def shard_cache(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MINLM_CACHE_DIR", str(tmp_path_factory.mktemp("shards")))
    yield
    mp.undo()


def base_cfgs(tmp_path, **train):
    model = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=1, n_heads=2,
                                    n_kv_heads=1, block_size=32)
    kw = dict(out_dir=str(tmp_path), max_iters=16, batch_size=4, lr=3e-3, warmup_iters=2,
              eval_interval=4, eval_iters=2, log_interval=4, checkpoint_interval=4,
              max_docs=200, num_workers=1, verbose=False)
    return model, TrainConfig(**{**kw, **train})


def test_candidates_and_overrides():
    assert grid(dim=[32, 64], lr=[1e-3]) == [{"dim": 32, "lr": 1e-3}, {"dim": 64, "lr": 1e-3}]
    cands = random_candidates(5, seed=1, n_layers=[1, 2], lr=(1e-4, 1e-2, "log"),
                              dim=(16, 64))
    assert len(cands) == 5 and all(1e-4 <= c["lr"] <= 1e-2 and isinstance(c["dim"], int) for c in cands)
    assert cands == random_candidates(5, seed=1, n_layers=[1, 2], lr=(1e-4, 1e-2, "log"),
                                      dim=(16, 64))
    with pytest.raises(ValueError, match="space\\['lr'\\]=\\('log', 0.0001, 0.01\\) is invalid"):
        random_candidates(2, lr=("log", 1e-4, 1e-2))  # the old spelling: one spelling for ranges
    m, t = split_overrides({"dim": 48, "lr": 1e-2}, ModelConfig(), TrainConfig())
    assert (m.dim, t.lr) == (48, 1e-2)
    with pytest.raises(ValueError, match="unknown config field.*widht"):
        grid(widht=[1])
    assert parse_bytes("2GB") == 2 * 2**30 and parse_bytes("512 MiB") == 512 * 2**20
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")


def test_measured_step_memory_counts_state_and_grows_with_batch(tmp_path):
    model, train = base_cfgs(tmp_path)
    from minlm.model import LM

    n = LM.count_params(model)
    sizes = [measure_step_memory(model, train.replace(batch_size=b)) for b in (4, 8, 16)]
    assert sizes[0] > 4 * 4 * n  # weights, grads and two AdamW moments in fp32, plus activations
    step1, step2 = sizes[1] - sizes[0], sizes[2] - sizes[1]
    assert step1 > 0 and step2 == pytest.approx(2 * step1, rel=0.05)  # activations ~ batch


def test_over_budget_candidates_are_skipped_and_the_rest_trained(tmp_path, shared_data):
    model, train = base_cfgs(tmp_path, max_iters=8)
    # (256, 2) measures about 31 MiB a step; (1024, 4) is estimated far over and never built
    result = search(grid(dim=[32, 256], n_layers=[1, 2]) + [{"dim": 1024, "n_layers": 4}],
                    model, train, memory_budget="24MB", n_rungs=1, verbose=False)
    by_dim = {(t.overrides["dim"], t.overrides["n_layers"]): t for t in result.trials}
    assert by_dim[(256, 2)].status == "skipped"
    assert by_dim[(256, 2)].reason.startswith("one training step needs")
    assert "far over the budget of 24.0 MiB" in by_dim[(1024, 4)].reason
    assert by_dim[(1024, 4)].status == "skipped"
    assert all(by_dim[k].status == "trained" for k in [(32, 1), (32, 2), (256, 1)])
    for t in result.trials:
        if t.status == "trained":
            assert t.peak_memory <= 24 * 2**20 and t.steps == 8 and (tmp_path / "search" / t.name).is_dir()
    table = result.table
    assert list(table["status"][-sum(t.status == "skipped" for t in result.trials):]) == ["skipped"] * sum(
        t.status == "skipped" for t in result.trials)
    bpb = [v for v in table["val_bpb"] if not math.isnan(v)]
    assert bpb == sorted(bpb) and len(bpb) >= 2
    fig = result.figure()
    assert fig.axes[0].get_xlabel() == "parameters"


def test_successive_halving_cuts_an_obviously_bad_trial(tmp_path, shared_data):
    model, train = base_cfgs(tmp_path)
    result = search(grid(lr=[3e-3, 1e-7]), model, train, eta=2, n_rungs=2, verbose=False)
    good, bad = result.trials
    assert bad.status == "cut" and bad.steps == 8 and "behind the best" in bad.reason
    assert good.status == "trained" and good.steps == 16  # resumed past the rung to the end
    assert [s for s, _ in good.curve] == [4, 8, 12, 16]
    assert result.best is good and result.table["trial"][0] == good.name



def test_compute_budget_gives_bigger_models_fewer_steps_and_equal_compute(tmp_path, shared_data):
    model, train = base_cfgs(tmp_path)
    per_step = lambda dim: (flops_per_token(model.replace(dim=dim))  # noqa: E731
                            * train.batch_size * model.block_size)
    budget = 40 * per_step(32)
    full = {32: 40, 64: steps_for_compute(model.replace(dim=64), train, budget)}
    assert steps_for_compute(model.replace(dim=32), train, budget) == 40
    assert 4 <= full[64] < 40  # the bigger model buys fewer steps
    result = search(grid(dim=[32, 64]), model, train, compute_budget=budget, eta=2, n_rungs=2,
                    verbose=False)
    assert sorted(t.status for t in result.trials) == ["cut", "trained"]
    for t in result.trials:
        steps = full[t.overrides["dim"]]
        if t.status == "cut":  # compared at the first rung: about half the budget each
            assert t.steps == _rungs(steps, 4, 2, 2)[0]
            assert t.compute == pytest.approx(budget / 2, rel=0.3)
        else:
            assert t.steps == steps and t.compute == pytest.approx(budget, rel=0.1)


def test_search_command_runs_a_grid_skips_oversized_and_saves_the_table(tmp_path, shared_data,
                                                                         capsys):
    import pandas as pd

    from minlm.cli import main

    code = main(["search", "--preset", "llama-0.5m", "--name", "grid", "--rungs", "1",
                 "--max-params", "40000", "vocab_size=512", "dim=32,96", "n_layers=1",
                 "n_heads=2", "n_kv_heads=1", "block_size=32", "lr=3e-3,1e-2", "max_iters=4",
                 "batch_size=4", "eval_interval=4", "eval_iters=1", "max_docs=200",
                 "num_workers=1", f"out_dir={tmp_path}"])
    out = capsys.readouterr().out
    assert code == 0, out
    table = pd.read_csv(tmp_path / "grid" / "results.csv")
    assert len(table) == 4 and (tmp_path / "grid" / "results.png").is_file()
    assert sorted(table["dim"]) == [32, 32, 96, 96] and set(table["lr"]) == {3e-3, 1e-2}
    big = table[table["dim"] == 96]
    assert (big["status"] == "skipped").all()
    assert big["reason"].str.contains("over the limit of 40,000").all()
    small = table[table["dim"] == 32]
    assert (small["status"] == "trained").all() and list(table["status"][:2]) == ["trained"] * 2
    assert "best: trial" in out
    # run folders are recorded relative to the search folder, and read back as paths to them
    from minlm.runs import load_run
    from minlm.search import read_results

    assert not any(os.path.isabs(str(v)) or str(tmp_path) in str(v) for v in table.values.ravel())
    assert set(table["run_dir"].dropna()) == set(table["trial"][table["status"] == "trained"])
    back = read_results(tmp_path / "grid")
    trained = back[back["status"] == "trained"]
    for run_dir in trained["run_dir"]:
        assert load_run(run_dir).model_config.dim == 32
    assert (back[back["status"] != "trained"]["run_dir"] == "").all()


def test_rungs_end_at_max_iters_once_even_off_the_evaluation_grid():
    assert _rungs(300, 50, 3, 3) == [50, 100, 300]
    assert _rungs(483, 20, 3, 2) == [160, 483]  # was [160, 480, 483]: one rung too many
    assert _rungs(16, 4, 2, 1) == [16]


# --- the Optuna study: kill and resume, several processes --------------------------------

SEARCH_SCRIPT = '''
import os, signal, sys, time
import optuna
from minlm import ModelConfig, TrainConfig
from minlm.search import grid, search

out, mode = sys.argv[1], sys.argv[2]
model = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=1, n_heads=2,
                                n_kv_heads=1, block_size=32)
train = TrainConfig(out_dir=out, max_iters=16, batch_size=4, lr=3e-3, warmup_iters=2,
                    eval_interval=4, eval_iters=2, log_interval=4, checkpoint_interval=4,
                    max_docs=200, num_workers=1, verbose=False)
waited = []

def running():
    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out}/search/study.db")
    return sum(t.state == optuna.trial.TrialState.RUNNING for t in study.get_trials())

def hook(trial, row):
    print(trial.name, row["step"], flush=True)
    if mode == "kill" and trial.name.startswith("trial01") and row["step"] >= 10:
        os.kill(os.getpid(), signal.SIGKILL)  # after the step-8 checkpoint, before step 12's
    if mode == "interrupt" and trial.name.startswith("trial01") and row["step"] >= 8:
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the trainer stops after this step
    if mode == "pair" and not waited:  # hold the first trial until the other process has one
        deadline = time.time() + 180
        while running() < 2 and time.time() < deadline:
            time.sleep(0.2)
        waited.append(running())

lrs = [3e-3, 2e-3, 1e-3] if mode != "pair" else [3e-3, 2e-3, 1e-3, 5e-4]
result = search(grid(lr=lrs), model, train, n_rungs=1, heartbeat=1, verbose=False,
                callbacks=[hook])
print("statuses", [t.status for t in result.trials], "waited", waited, flush=True)
'''


def _run_search(script, out, mode, shared_data, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINLM_DATA_DIR": str(shared_data),
           "MINLM_CACHE_DIR": str(tmp_path / "shards"), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, str(script), str(out), mode], env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def _trials_by_candidate(out):
    import optuna

    study = optuna.load_study(study_name="search", storage=f"sqlite:///{out}/search/study.db")
    by = {}
    for f in study.get_trials():
        by.setdefault(f.params.get("candidate"), []).append(f)
    return by


@pytest.mark.parametrize("how", ["kill", "interrupt"])
def test_a_killed_search_resumes_without_repeating_finished_trials(tmp_path, shared_data, how):
    """SIGKILL (the trial is found by its silent heartbeat) or Ctrl-C (the trainer stops and
    checkpoints, the search stops): the next run resumes the trial from its checkpoint."""
    import optuna

    script = tmp_path / "run_search.py"
    script.write_text(SEARCH_SCRIPT)
    out = tmp_path / "runs"
    stopped = _run_search(script, out, how, shared_data, tmp_path)
    stdout, stderr = stopped.communicate(timeout=600)
    if how == "kill":
        assert stopped.returncode == -signal.SIGKILL, stdout + stderr
        time.sleep(4)  # three silent heartbeats (1 s each) mark the killed trial stale
    else:  # was: the interrupted trial counted as trained at step 8, and the search went on
        # the KeyboardInterrupt escapes search() to the script. Python then usually ends with
        # SIGINT's status, but not always: torch._dynamo's exit hook imports tabulate where it
        # is installed (lm_eval brings it), and after that import CPython exits 1 (seen here:
        # `import torch._dynamo; raise KeyboardInterrupt` exits 1 with tabulate, by SIGINT
        # without). The CLI's own 130 is tested in test_faults.py.
        assert stopped.returncode in (-signal.SIGINT, 1), stderr
        last = stderr.strip().splitlines()[-1]
        assert last.startswith("KeyboardInterrupt: search interrupted (Ctrl-C) in "
                               "trial01-lr=0.002 at step 8"), stderr
    first = tmp_path / "runs" / "search" / "trial00-lr=0.003"
    finished_log = (first / "log.csv").read_text()
    stamp = (first / "log.csv").stat().st_mtime_ns

    resumed = _run_search(script, out, "resume", shared_data, tmp_path)
    stdout, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stdout + stderr
    assert "statuses ['trained', 'trained', 'trained']" in stdout
    seen = [line.split() for line in stdout.splitlines() if line.startswith("trial")]
    assert not [s for s in seen if s[0].startswith("trial00")]  # the finished trial: not rerun
    assert [int(s[1]) for s in seen if s[0].startswith("trial01")] == [12, 16]  # from step 8
    assert [int(s[1]) for s in seen if s[0].startswith("trial02")] == [4, 8, 12, 16]
    assert (first / "log.csv").read_text() == finished_log
    assert (first / "log.csv").stat().st_mtime_ns == stamp
    by = _trials_by_candidate(out)
    states = {c: [f.state for f in fs] for c, fs in by.items()}
    done = optuna.trial.TrialState.COMPLETE
    assert states == {0: [done], 1: [optuna.trial.TrialState.FAIL, done], 2: [done]}


def test_two_processes_share_one_study(tmp_path, shared_data):
    import optuna

    script = tmp_path / "run_search.py"
    script.write_text(SEARCH_SCRIPT)
    out = tmp_path / "runs"
    procs = [_run_search(script, out, "pair", shared_data, tmp_path) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (stdout, stderr) in zip(procs, outputs):
        assert p.returncode == 0, stdout + stderr
        # each saw every trial finished, whoever trained it
        assert "statuses ['trained', 'trained', 'trained', 'trained']" in stdout
        assert "waited [2]" in stdout  # each held a trial while the other held one
    by = _trials_by_candidate(out)
    assert sorted(by) == [0, 1, 2, 3]
    assert all([f.state for f in fs] == [optuna.trial.TrialState.COMPLETE] for fs in by.values())
    assert {fs[0].user_attrs["pid"] for fs in by.values()} == {p.pid for p in procs}


def test_a_finished_study_is_read_back_and_other_candidates_are_refused(tmp_path, shared_data):
    model, train = base_cfgs(tmp_path, max_iters=4)
    first = search(grid(lr=[3e-3]), model, train, n_rungs=1, verbose=False)
    again = search(grid(lr=[3e-3]), model, train, n_rungs=1, verbose=False,
                   callbacks=[lambda t, row: pytest.fail("a finished trial trained again")])
    assert again.table.to_dict() == first.table.to_dict()
    with pytest.raises(ValueError, match="study 'search' in sqlite:///.*holds other candidates "
                                         r"\(1, not these 2\); give this search another name"):
        search(grid(lr=[3e-3, 1e-3]), model, train, n_rungs=1, verbose=False)


# --- TPE sampling and Hyperband ------------------------------------------------------------

SPACE = {"lr": (1e-3, 1e-2, "log"), "n_layers": [1, 2]}


def _tpe(tmp_path, n_trials, checkpoint_interval=8, **kw):
    model, train = base_cfgs(tmp_path, max_iters=8, checkpoint_interval=checkpoint_interval)
    return search(None, model, train, sampler="tpe", space=kw.pop("space", SPACE),
                  n_trials=n_trials, pruner="hyperband", eta=2, n_rungs=2, seed=0,
                  verbose=False, **kw)


def _study_trials(tmp_path):
    import optuna

    return optuna.load_study(study_name="search",
                             storage=f"sqlite:///{tmp_path}/search/study.db").get_trials()


def test_tpe_with_hyperband_runs_n_trials_into_one_study_and_resumes_without_repeats(
        tmp_path, shared_data, monkeypatch):
    import optuna

    made = []

    class Recorded(optuna.pruners.HyperbandPruner):
        def __init__(self, **kw):
            made.append(kw)
            super().__init__(**kw)

    monkeypatch.setattr(optuna.pruners, "HyperbandPruner", Recorded)
    first = _tpe(tmp_path, 3)
    # the same rungs as successive halving: rung k reported as step eta**k, the last eta**(n-1)
    assert made[0] == {"min_resource": 1, "max_resource": 2, "reduction_factor": 2}
    assert [t.name[:8] for t in first.trials] == ["trial00-", "trial01-", "trial02-"]
    for t in first.trials:
        assert t.status in ("trained", "cut") and set(t.overrides) == {"lr", "n_layers"}
        assert 1e-3 <= t.overrides["lr"] <= 1e-2 and t.overrides["n_layers"] in (1, 2)
        assert (tmp_path / "search" / t.name).is_dir()
    assert [f.intermediate_values for f in _study_trials(tmp_path)][0].keys() == {1}

    again = _tpe(tmp_path, 3, callbacks=[lambda t, row: pytest.fail("a finished trial trained again")])
    assert again.table.to_dict() == first.table.to_dict()
    assert len(_study_trials(tmp_path)) == 3

    more = _tpe(tmp_path, 4)  # a larger n_trials draws only the missing one
    assert [t.name for t in more.trials[:3]] == [t.name for t in first.trials]
    assert more.trials[3].name.startswith("trial03-") and len(_study_trials(tmp_path)) == 4
    with pytest.raises(ValueError, match="holds another space"):
        _tpe(tmp_path, 4, space={"lr": (1e-3, 1e-2)})


def test_an_interrupted_tpe_trial_resumes_its_run_and_keeps_its_candidate(tmp_path, shared_data):
    import optuna

    def interrupt(t, row):
        if t.name.startswith("trial01") and row["step"] == 4:
            os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C: the trainer stops after this step

    with pytest.raises(KeyboardInterrupt,
                       match=r"search interrupted \(Ctrl-C\) in trial01-.* at step 4"):
        _tpe(tmp_path, 2, callbacks=[interrupt], checkpoint_interval=4)
    seen = []
    resumed = _tpe(tmp_path, 2, callbacks=[lambda t, row: seen.append((t.name[:7], row["step"]))])
    assert seen == [("trial01", 8)]  # trial00 is not rerun; trial01 goes on from step 4
    assert [t.status for t in resumed.trials] == ["trained", "trained"]
    states = [(f.state, f.params) for f in _study_trials(tmp_path)]
    assert [s for s, _ in states] == [optuna.trial.TrialState.COMPLETE,
                                      optuna.trial.TrialState.FAIL,
                                      optuna.trial.TrialState.COMPLETE]
    assert states[2][1] == states[1][1] == resumed.trials[1].overrides  # the same candidate


def test_tpe_trials_over_the_limits_are_skipped_and_count_as_trials(tmp_path, shared_data):
    result = _tpe(tmp_path, 2, max_params=1000)
    assert [t.status for t in result.trials] == ["skipped", "skipped"]
    assert all("over the limit of 1,000" in t.reason for t in result.trials)
    assert len(_study_trials(tmp_path)) == 2 and not list((tmp_path / "search").glob("trial*"))


@pytest.mark.parametrize("space, message", [
    ({"lr": (1e-2, 1e-3)}, r"space\['lr'\]=\(0.01, 0.001\) is invalid: use a list of choices"),
    ({"lr": (0, 1e-2, "log")}, r"space\['lr'\]=\(0, 0.01, 'log'\) is invalid"),
    ({"n_layers": []}, r"space\['n_layers'\]=\[\] is invalid: a choice needs values"),
    ({"nope": [1]}, "unknown config field"),
])
def test_a_bad_space_is_refused_naming_the_field(tmp_path, space, message):
    with pytest.raises(ValueError, match=message):
        _tpe(tmp_path, 1, space=space)


def test_search_command_samples_with_tpe_and_hyperband(tmp_path, shared_data, capsys):
    import pandas as pd

    from minlm.cli import main

    tiny = ["vocab_size=512", "dim=32", "n_heads=2", "n_kv_heads=1", "block_size=32",
            "max_iters=4", "batch_size=4", "eval_interval=4", "eval_iters=1", "max_docs=200",
            "num_workers=1", f"out_dir={tmp_path}"]
    code = main(["search", "--preset", "llama-0.5m", "--name", "tpe", "--sampler", "tpe",
                 "--trials", "2", "--pruner", "hyperband", "--seed", "1", "lr=1e-3:1e-2:log",
                 "n_layers=1,2", *tiny])
    out = capsys.readouterr().out
    assert code == 0, out
    table = pd.read_csv(tmp_path / "tpe" / "results.csv")
    assert len(table) == 2 and (table["status"] == "trained").all()
    assert table["lr"].between(1e-3, 1e-2).all() and set(table["n_layers"]) <= {1, 2}
    assert main(["search", "--name", "g", "lr=1e-3:1e-2", *tiny]) == 2
    assert "'lr=1e-3:1e-2' is a range; ranges need --sampler tpe" in capsys.readouterr().err
    assert main(["search", "--name", "g", "--sampler", "tpe", "--pruner", "nope",
                 "--trials", "1", "lr=1e-3:1e-2", *tiny]) == 2
    assert "pruner='nope' is invalid: use one of halving, hyperband" in capsys.readouterr().err


def test_parse_space_reads_axes_ranges_and_fixed_settings_through_the_configs():
    """What ``python -m minlm search`` is given on its command line, parsed in one place."""
    from minlm.config import ConfigError

    model_cfg, train_cfg, space = parse_space(
        ["lr=1e-3:1e-2:log", "dim=64,128", "n_layers=2", "batch_size=8", "activation=gelu,relu2"],
        "llama-1m", tpe=True)
    assert (model_cfg.n_layers, model_cfg.vocab_size, train_cfg.batch_size) == (2, 2048, 8)
    assert space == {"dim": [64, 128], "activation": ["gelu", "relu2"], "lr": (1e-3, 1e-2, "log")}
    random_candidates(3, **space)  # the one spelling TPE and random draws share
    assert parse_space(["data=hf:owner/name"], "llama-1m", tpe=False)[1].data == "hf:owner/name"
    with pytest.raises(ConfigError, match="ranges need --sampler tpe"):
        parse_space(["lr=1e-3:1e-2"], "llama-1m", tpe=False)
    with pytest.raises(ConfigError, match="dim"):
        parse_space(["dim=64,wide"], "llama-1m", tpe=False)


def test_a_corrupt_study_file_is_one_line_naming_it_and_is_left_as_it_was(tmp_path, shared_data):
    """A study.db that is not a database (a disk fault, a copy cut short) is said in one line
    with its path and what to do; the driver's SQL and traceback stay out, the file stays."""
    folder = tmp_path / "grid"
    folder.mkdir()
    junk = bytes(range(256)) * 20
    (folder / "study.db").write_bytes(junk)
    p = subprocess.run([sys.executable, "-m", "minlm", "search", "--preset", "llama-0.5m",
                        "--name", "grid", "--rungs", "1", "vocab_size=512", "dim=32",
                        "n_layers=1", "n_heads=2", "block_size=32", "max_iters=2",
                        "batch_size=2", "eval_iters=1", "max_docs=50", f"out_dir={tmp_path}"],
                       capture_output=True, text=True, timeout=300,
                       env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert p.returncode == 2, p.stdout + p.stderr
    errors = [line for line in p.stderr.splitlines() if line.strip()]
    assert len(errors) == 1, p.stderr
    assert errors[0].startswith("error: cannot read the search's study ")
    assert str(folder / "study.db") in errors[0] and "move it aside" in errors[0]
    assert "SQL" not in p.stderr and "Traceback" not in p.stderr
    assert (folder / "study.db").read_bytes() == junk
