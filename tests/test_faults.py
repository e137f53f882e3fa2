"""Faults at random moments, in real processes, for pretraining, SFT and DPO: SIGTERM (what
``kill`` and schedulers send), SIGKILL, and a disk that fills up. After each, the run either
resumes to exactly the weights of an uninterrupted run, or has exited non-zero saying why,
with its previous good checkpoint untouched. The counts are printed (``pytest -s``).

The full disk is a small tmpfs the test mounts where it may (root), else a file-size limit
(``ulimit -f``), under which the next checkpoint write fails the same way."""

from __future__ import annotations

import json
import os
import random
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from minlm import ModelConfig, TrainConfig, runs
from minlm.chatdata import write_conversations
from minlm.model import LM
from minlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.slow

CONVS = [[{"role": "user", "content": f"What colour is the {thing}?"},
          {"role": "assistant", "content": f"The {thing} is {colour}."}]
         for thing, colour in [("sky", "blue"), ("grass", "green"), ("sun", "yellow"),
                               ("snow", "white"), ("night", "dark"), ("cat", "grey")]] * 4
PRETRAIN = ["train", "--preset", "llama-0.5m", "vocab_size=512", "dim=32", "n_layers=2",
            "n_heads=2", "n_kv_heads=1", "block_size=32", "dropout=0.1", "batch_size=8",
            "max_iters=150", "warmup_iters=10", "log_interval=1", "eval_interval=50",
            "eval_iters=2", "checkpoint_interval=7", "max_docs=300", "num_workers=1"]
TUNE = ["batch_size=4", "warmup_iters=2", "log_interval=1", "checkpoint_interval=5",
        "patience=0", "lr=3e-3"]
COUNTS = {"injected": 0, "survived": 0, "lost": 0}


@pytest.fixture(scope="module")
def setting(tmp_path_factory):
    """A parent run (an untrained tiny model) and the SFT and DPO data files."""
    root = tmp_path_factory.mktemp("faults")
    tok = load_tokenizer("tinystories-512")
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-1m", vocab_size=512, dim=16, n_layers=1, n_heads=2,
                                  n_kv_heads=0, block_size=96, multiple_of=8, dropout=0.1)
    model = LM(cfg)
    parent = root / "parents" / "base"
    parent.mkdir(parents=True)
    runs.save_configs(parent, cfg, TrainConfig(preset="llama-1m"),
                      meta={"tokenizer_hash": tok.hash, "params": model.num_params()})
    runs.save_weights(parent, model)
    runs.copy_tokenizer(parent, tok)
    write_conversations(CONVS, root / "chat.jsonl")
    with open(root / "pairs.jsonl", "w") as f:
        for c in CONVS:
            f.write(json.dumps({"prompt": c[:1], "chosen": c[1]["content"],
                                "rejected": "I do not know."}) + "\n")
    yield root, parent
    print(f"\nfaults injected {COUNTS['injected']}, survived {COUNTS['survived']}, "
          f"lost {COUNTS['lost']}")


def command(kind: str, setting, out_dir: Path, name: str) -> list[str]:
    root, parent = setting
    if kind == "pretrain":
        args = PRETRAIN
    elif kind == "sft":
        args = ["sft", str(parent), "--data", str(root / "chat.jsonl"), "epochs=30", *TUNE]
    else:
        args = ["dpo", str(parent), "--data", str(root / "pairs.jsonl"), "epochs=12", *TUNE]
    return [sys.executable, "-m", "minlm", *args, f"out_dir={out_dir}", f"run_name={name}",
            "verbose=false"]


def launch(cmd: list[str], file_limit: int = 0) -> subprocess.Popen:
    """Start the run, or resume it once it has written its configs (resume=true refuses a run
    that does not exist, as a person would be told)."""
    def limit():  # runs in the child: a file-size limit stands in for a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, file_limit))

    given = dict(a.split("=", 1) for a in cmd if a.startswith(("out_dir=", "run_name=")))
    if (Path(given["out_dir"]) / given["run_name"] / "train_config.json").exists():
        cmd = [*cmd, "resume=true"]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            preexec_fn=limit if file_limit else None)


def last_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "log.csv").read_text().strip().splitlines()
        return int(lines[-1].split(",")[0]) if len(lines) > 1 else -1
    except (FileNotFoundError, ValueError, IndexError):
        return -1


def wait_for_step(p: subprocess.Popen, run_dir: Path, target: int) -> bool:
    """True once the run has logged ``target``; False when it ended first."""
    deadline = time.time() + 180
    while p.poll() is None and last_step(run_dir) < target and time.time() < deadline:
        time.sleep(0.005)
    return p.poll() is None


def newest_checkpoint(run_dir: Path) -> tuple[int, bytes] | None:
    found = runs.list_checkpoints(run_dir)
    return (found[0][0], found[0][1].read_bytes()) if found else None


def status(run_dir: Path) -> str:
    return json.loads((run_dir / "train_config.json").read_text())["meta"]["status"]


def try_mount_tmpfs(where: Path, size: str) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not shutil.which("mount") or os.environ.get("MINLM_FAULTS_NO_TMPFS"):
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where)],
                          capture_output=True)
    return done.returncode == 0


def fill(where: Path) -> Path:
    """Take every free byte of the filesystem at ``where``."""
    filler = where / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
                f.flush()
        except OSError:
            pass
    return filler


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_faults_then_resume_give_the_uninterrupted_weights(kind, setting, tmp_path, monkeypatch):
    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path / "cache"))
    straight = launch(command(kind, setting, tmp_path / "straight", "run"))
    out, _ = straight.communicate(timeout=600)
    assert straight.returncode == 0, out.decode()[-2000:]
    ckpt_size = runs.list_checkpoints(tmp_path / "straight" / "run")[0][1].stat().st_size

    disk = tmp_path / "disk"
    tmpfs = try_mount_tmpfs(disk, "16m")
    run_dir = disk / "run"
    cmd = command(kind, setting, disk, "run")
    rng = random.Random({"pretrain": 1, "sft": 2, "dpo": 3}[kind])
    faults = ["sigterm", "sigkill", "disk"]
    rng.shuffle(faults)
    try:
        for fault in faults:
            start = max(last_step(run_dir), 0)
            limit = ckpt_size // 2 if fault == "disk" and not tmpfs else 0
            p = launch(cmd, limit)
            if not wait_for_step(p, run_dir, start + rng.randint(1, 12)):
                out = p.communicate()[0].decode()
                if fault == "disk" and limit:  # the limit hit the first checkpoint write
                    assert p.returncode == 1 and "could not write" in out, out[-2000:]
                    COUNTS["injected"] += 1
                    continue
                pytest.fail(f"{kind}: the run ended before the {fault} fault: {out[-2000:]}")
            before = newest_checkpoint(run_dir)
            COUNTS["injected"] += 1
            if fault == "sigterm":
                p.send_signal(signal.SIGTERM)
                out = p.communicate(timeout=120)[0].decode()
                assert p.returncode == 143, out[-2000:]
                assert "continue it with: python -m minlm" in out and "resume=true" in out
                assert "terminated (SIGTERM)" in status(run_dir)
                assert newest_checkpoint(run_dir)[0] == int(status(run_dir).split()[3].rstrip(":"))
            elif fault == "sigkill":
                p.send_signal(signal.SIGKILL)
                p.wait(timeout=60)
            else:
                filler = fill(disk) if tmpfs else None
                out = p.communicate(timeout=180)[0].decode()
                if filler:
                    filler.unlink()
                assert p.returncode == 1, out[-2000:]
                assert "FAILED" in out or "could not write" in out, out[-2000:]
                after = newest_checkpoint(run_dir)
                if before is not None:  # the good checkpoint is still there, untouched
                    assert after is not None and after[0] >= before[0]
                    if after[0] == before[0]:
                        assert after[1] == before[1]
            try:  # whatever happened, what is on disk reads back
                runs.load_checkpoint(run_dir, log=lambda *_: None)
            except runs.RunError:
                assert runs.list_checkpoints(run_dir) == []  # killed before the first one
        p = launch(cmd)
        out = p.communicate(timeout=600)[0].decode()
        assert p.returncode == 0, out[-2000:]
        a = runs.load_run(tmp_path / "straight" / "run").model.state_dict()
        b = runs.load_run(run_dir).model.state_dict()
        same = all(torch.equal(a[k], b[k]) for k in a)
        COUNTS["survived" if same else "lost"] += len(faults)
        assert same, f"{kind}: resumed weights differ from the uninterrupted run's"
        assert status(run_dir) == "finished"
    finally:
        if tmpfs:
            subprocess.run(["umount", "-l", str(disk)], check=False)


# --- search: SIGTERM and SIGKILL in the middle of a trial, then the same command again -------

SEARCH = ["search", "--preset", "llama-0.5m", "--name", "q", "--rungs", "1", "vocab_size=512",
          "dim=32", "n_layers=1", "n_heads=2", "n_kv_heads=1", "block_size=32", "batch_size=8",
          "lr=3e-3,2e-3,1e-3", "max_iters=300", "warmup_iters=5", "eval_interval=100",
          "eval_iters=2", "log_interval=10", "checkpoint_interval=20", "max_docs=300",
          "num_workers=1"]


def _log_rows(run_dir: Path) -> list[str]:
    return (run_dir / "log.csv").read_text().strip().splitlines()[1:]


def _search_trials(folder: Path) -> dict:
    import optuna

    study = optuna.load_study(study_name="q", storage=f"sqlite:///{folder / 'study.db'}")
    by: dict = {}
    for f in study.get_trials():
        queued = f.system_attrs.get("fixed_params", {}).get("candidate")
        by.setdefault(f.params.get("candidate", queued), []).append(f.state.name)
    return by


@pytest.mark.parametrize("fault", [signal.SIGTERM, signal.SIGINT, signal.SIGKILL])
def test_a_search_stopped_mid_trial_resumes_that_trial_to_its_budget(fault, tmp_path):
    """SIGTERM (was: exit 0, the cut-off trial recorded as trained and never resumed), Ctrl-C
    (was: Optuna's traceback) or SIGKILL while the second trial trains; the same command
    again: the first trial is not repeated, the second goes on from its checkpoint to
    max_iters, the third trains."""
    cmd = [sys.executable, "-m", "minlm", *SEARCH, f"out_dir={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINLM_CACHE_DIR": str(tmp_path / "cache")}
    folder = tmp_path / "q"
    second = folder / "trial01-lr=0.002"
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 300
    while p.poll() is None and not runs.list_checkpoints(second) and time.time() < deadline:
        time.sleep(0.01)
    assert p.poll() is None, p.communicate()
    p.send_signal(fault)
    out, err = p.communicate(timeout=300)
    COUNTS["injected"] += 1
    if fault != signal.SIGKILL:  # Ctrl-C printed Optuna's traceback; SIGTERM exited 0
        assert p.returncode == (143 if fault == signal.SIGTERM else 130), out + err
        how = "terminated (SIGTERM)" if fault == signal.SIGTERM else "interrupted (Ctrl-C)"
        assert f"search {how} in trial01-lr=0.002 at step" in err
        assert "saved as interrupted: run the same search again to resume" in err
        assert "Traceback" not in err and "optuna" not in err.lower(), err
        assert err.strip().count("\n") == 0, err  # one line
        assert _search_trials(folder) == {0: ["COMPLETE"], 1: ["FAIL"], 2: ["WAITING"]}
    else:
        assert p.returncode == -signal.SIGKILL
    first_log = (folder / "trial00-lr=0.003" / "log.csv").read_text()
    kept = runs.list_checkpoints(second)[0][0]
    before = [r for r in _log_rows(second) if int(r.split(",")[0]) <= kept]
    assert 0 < kept < 300

    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600,
                           check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "Traceback" not in again.stderr
    assert (folder / "trial00-lr=0.003" / "log.csv").read_text() == first_log  # not repeated
    rows = _log_rows(second)
    assert rows[:len(before)] == before  # resumed from its checkpoint, not started again
    assert int(rows[-1].split(",")[0]) == 300  # and trained to its budget
    steps = [int(r.split(",")[0]) for r in rows]
    assert steps == sorted(set(steps))
    import pandas as pd

    table = pd.read_csv(folder / "results.csv").set_index("trial")
    assert table.loc["trial01-lr=0.002", "status"] == "trained"
    assert table.loc["trial01-lr=0.002", "steps"] == 300
    assert _search_trials(folder) == {0: ["COMPLETE"], 1: ["FAIL", "COMPLETE"], 2: ["COMPLETE"]}
    COUNTS["survived"] += 1
