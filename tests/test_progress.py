"""What `python -m minlm train` shows and does on a time budget, run as a person runs it."""

from __future__ import annotations

import os
import re
import subprocess
import sys

from minlm.runs import read_log
from tests.conftest import REPO


def test_time_budget_bar_counts_seconds_and_the_budget_holds(tmp_path, shared_data):
    budget_s = 4
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINLM_CACHE_DIR": str(tmp_path / "cache"),
           "OMP_NUM_THREADS": "1", "MINLM_DATA_DIR": str(shared_data)}
    proc = subprocess.run(
        [sys.executable, "-m", "minlm", "train", "--preset", "llama-0.5m", "vocab_size=512",
         "dim=32", "n_layers=2", "n_heads=2", "n_kv_heads=1", "block_size=32", "batch_size=4",
         f"max_minutes={budget_s / 60}", "max_iters=1000000", "eval_interval=50", "eval_iters=2",
         "log_interval=5", "max_docs=200", f"out_dir={tmp_path}", "run_name=budget", "num_workers=1"],
        env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    frames = [f for f in re.split(r"[\r\n]", proc.stderr) if f.startswith("budget:")]
    assert frames, proc.stderr[-2000:]
    # the bar shows seconds of the budget with a percentage, and ends full
    assert re.search(rf"budget: +100%.*\| *\d+/\d+ \[", frames[-1]), frames[-1]
    assert all(re.search(rf"/{budget_s} \[", f) or "/" not in f for f in frames), frames[-1]
    assert not [f for f in frames if "min_left=-" in f]
    assert proc.stdout.count("run ") + proc.stderr.count("run " + str(tmp_path)) == 1  # once
    log = read_log(tmp_path / "budget")
    step_s = log["elapsed_s"].diff().div(log["step"].diff()).max()
    assert log["elapsed_s"].iloc[-1] <= budget_s + step_s  # within one step of the budget
