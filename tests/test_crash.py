"""Kill a training run with SIGKILL at random moments, resume each time, and end up exactly
where an uninterrupted run ends: same weights, same log rows, never an unreadable folder."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from minlm.runs import list_checkpoints, load_checkpoint, load_run, read_configs, read_log

COLUMNS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb", "grad_norm"]
ARGS = ["--preset", "llama-0.5m", "vocab_size=512", "dim=32", "n_layers=2", "n_heads=2",
        "n_kv_heads=1", "block_size=32", "dropout=0.1", "batch_size=8", "max_iters=120",
        "warmup_iters=10", "log_interval=2", "eval_interval=20", "eval_iters=2",
        "checkpoint_interval=6", "keep_checkpoints=2", "max_docs=300", "num_workers=1",
        "verbose=false"]


def launch(out_dir: Path, name: str, env_extra: dict | None = None) -> subprocess.Popen:
    """Start the run, or resume it once it has written its configs (resume=true refuses a run
    that does not exist)."""
    env = {**os.environ, **(env_extra or {})}
    resume = ["resume=true"] if (out_dir / name / "train_config.json").exists() else []
    cmd = [sys.executable, "-m", "minlm", "train", *ARGS, *resume, f"out_dir={out_dir}",
           f"run_name={name}"]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def last_logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "log.csv").read_text().strip().splitlines()
        return int(lines[-1].split(",")[0]) if len(lines) > 1 else 0
    except (FileNotFoundError, ValueError, IndexError):
        return 0


def assert_readable(run_dir: Path) -> None:
    if not (run_dir / "train_config.json").exists():
        return  # killed before the folder was written: nothing to read yet
    read_configs(run_dir)
    if list_checkpoints(run_dir):
        state = load_checkpoint(run_dir, log=lambda *_: None)
        assert state["step"] > 0
    if (run_dir / "model.safetensors").exists():
        load_run(run_dir)


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path / "cache"))
    straight = launch(tmp_path, "straight")
    out, _ = straight.communicate(timeout=300)
    assert straight.returncode == 0, out.decode()[-2000:]

    run_dir = tmp_path / "crashy"
    rng = random.Random(1234)
    kills = 0
    # one kill lands inside a checkpoint write (temp file written, not yet renamed)
    crash_env = {"MINLM_CRASH_DURING_WRITE": "checkpoint-00000030.pt"}
    p = launch(tmp_path, "crashy", crash_env)
    p.wait(timeout=300)
    assert p.returncode == -signal.SIGKILL
    kills += 1
    assert any(run_dir.glob(".checkpoint-00000030.pt.*.tmp")), "the crash should leave a temp file"
    assert_readable(run_dir)
    while kills < 6:
        start_step = last_logged_step(run_dir)
        target = start_step + rng.randint(3, 15)
        p = launch(tmp_path, "crashy")
        deadline = time.time() + 120
        while p.poll() is None and last_logged_step(run_dir) < target and time.time() < deadline:
            time.sleep(0.01)
        if p.poll() is not None:
            break  # finished before we could kill it
        p.send_signal(signal.SIGKILL)
        p.wait()
        kills += 1
        assert_readable(run_dir)
    assert kills >= 5
    p = launch(tmp_path, "crashy")
    out, _ = p.communicate(timeout=300)
    assert p.returncode == 0, out.decode()[-2000:]

    a = load_run(tmp_path / "straight").model.state_dict()
    b = load_run(run_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a, log_b = read_log(tmp_path / "straight")[COLUMNS], read_log(run_dir)[COLUMNS]
    pd.testing.assert_frame_equal(log_a, log_b)
