"""The one-shot GPU check (bench/gpu.py) walks every stage on the CPU in its dry run.

A GPU is rare here, and its time short: this proves, on every CI run, that the script the
first GPU will run gets through every stage, writes its table and plot, and that every
correctness check it makes passes on the CPU path.
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
STAGES = {"env", "correctness", "speed", "generate", "train"}


def test_dry_run_walks_every_stage(tmp_path, shared_data):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": str(REPO), "MINLM_DATA_DIR": str(shared_data),
           "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--dry-run",
                           "--out", str(out)], capture_output=True, text=True, env=env,
                          timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    doc = json.loads((out / "results.json").read_text())
    rows = doc["rows"]
    assert {r["stage"] for r in rows} == STAGES
    bad = [r for r in rows if r["status"] not in ("pass", "info")]
    assert not bad, bad
    checks = {r["check"] for r in rows if r["status"] == "pass"}
    for needed in ("llama-1m step bf16 cpu vs CPU fp32", "gpt2-1m step fp32 cpu vs CPU fp32",
                   "compiled = eager: loss (llama-1m fp32)",
                   "llama-1m: cached = uncached greedy tokens",
                   "kill at step 13 + resume = straight 20 steps",
                   "FSDP2 one process: wraps and trains", "lillm-39m run: final val loss"):
        assert needed in checks, (needed, sorted(checks))
    speed = {r["check"]: r for r in rows if r["stage"] == "speed"}
    assert speed["gpt2-124m: minlm bf16 compiled / transformers"]["value"] > 0
    with open(out / "results.csv") as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (out / "loss_curve.png").read_bytes()[:4] == b"\x89PNG"


def test_refuses_without_a_gpu_unless_dry(tmp_path):
    import pytest
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    proc = subprocess.run([sys.executable, str(REPO / "bench" / "gpu.py"), "--out",
                           str(tmp_path)], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)
    assert proc.returncode == 2
    assert "--dry-run" in proc.stderr
