"""DDP under torchrun on CPU (gloo): two processes train exactly like one with the same
global batch, and the checkpoint resumes in a single process."""

import os
import subprocess
import sys

import pytest
import torch

from minlm.runs import list_checkpoints, load_run, read_log

ARGS = ["--preset", "llama-0.5m", "vocab_size=512", "dim=32", "n_layers=2", "n_heads=2",
        "n_kv_heads=1", "block_size=32", "batch_size=8", "max_iters=6", "warmup_iters=2",
        "log_interval=2", "eval_interval=6", "eval_iters=1", "checkpoint_interval=6",
        "max_docs=200", "num_workers=1", "verbose=false"]


def run(cmd, env):
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    return p


@pytest.mark.slow
# Muon's Newton-Schulz iterations run in bf16 (PyTorch's implementation), which turns the
# last-bit difference between one mean gradient and the average of two into ~1e-4.
@pytest.mark.parametrize("optimizer, tolerance", [("adamw", 1e-5), ("muon", 1e-3)])
def test_two_process_ddp_matches_one_process_and_resumes_alone(tmp_path, optimizer, tolerance):
    env = {**os.environ, "MINLM_CACHE_DIR": str(tmp_path / "cache"), "OMP_NUM_THREADS": "1",
           "GLOO_SOCKET_IFNAME": "lo"}
    common = [*ARGS, f"out_dir={tmp_path}", f"optimizer={optimizer}"]
    run([sys.executable, "-m", "minlm", "train", *common, "run_name=one"], env)
    p = run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
             "-m", "minlm", "train", *common, "run_name=two"], env)
    assert p.stdout.count(f"run {tmp_path / 'two'}: step 6,") == 1, p.stdout  # rank 0, once
    one = load_run(tmp_path / "one").model.state_dict()
    two = load_run(tmp_path / "two").model.state_dict()
    worst = max((one[k] - two[k]).abs().max().item() for k in one)
    assert worst < tolerance, worst
    log_one, log_two = read_log(tmp_path / "one"), read_log(tmp_path / "two")
    assert log_one["train_loss"].tolist() == pytest.approx(log_two["train_loss"].tolist(), abs=10 * tolerance)

    # the two-process checkpoint resumes in one process
    run([sys.executable, "-m", "minlm", "train", "run_name=two", f"out_dir={tmp_path}",
         "resume=true", "max_iters=9", "verbose=false"], env)
    assert list_checkpoints(tmp_path / "two")[0][0] == 9
    assert read_log(tmp_path / "two")["step"].iloc[-1] == 9
    assert torch.isfinite(torch.tensor(read_log(tmp_path / "two")["train_loss"].iloc[-1]))
