"""Resume reads the data the run was trained on: found from any working directory, and a
corpus that changed under the run refused (``allow_data_change=true`` to go on knowingly).
Real ``python -m minlm`` processes, as a person resumes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TINY = ["--preset", "llama-0.5m", "vocab_size=512", "dim=32", "n_layers=1", "n_heads=2",
        "n_kv_heads=1", "block_size=16", "batch_size=4", "warmup_iters=2", "eval_interval=5",
        "eval_iters=1", "log_interval=5", "checkpoint_interval=5", "num_workers=1",
        "verbose=false"]


def corpus(word: str) -> str:
    return "".join(f"Once upon a time a {word} named Tom{i} found a red ball in the park.\n\n"
                   for i in range(80))


def minlm(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINLM_CACHE_DIR": str(cwd / ".cache")}
    return subprocess.run([sys.executable, "-m", "minlm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def last_step(run: Path) -> int:
    return int((run / "log.csv").read_text().strip().splitlines()[-1].split(",")[0])


def test_resume_finds_its_data_from_anywhere_and_refuses_a_changed_corpus(tmp_path):
    work, elsewhere = tmp_path / "work", tmp_path / "elsewhere"
    work.mkdir()
    elsewhere.mkdir()
    (work / "a.txt").write_text(corpus("cat"))
    (work / "b.txt").write_text(corpus("dog") * 2)
    prep = ["--tokenizer", "tinystories-512", "--out", "P16", "--workers", "1"]
    assert minlm(work, "prepare", "a.txt", *prep).returncode == 0
    runs = tmp_path / "runs"
    first = minlm(work, "train", *TINY, f"data={work / 'P16'}", f"out_dir={runs}",
                  "run_name=t16", "max_iters=10")
    assert first.returncode == 0, first.stderr
    assert last_step(runs / "t16") == 10

    # was: data='P16' is neither a dataset name ... (the run had kept the folder's name only)
    on = minlm(elsewhere, "train", f"out_dir={runs}", "run_name=t16", "resume=true",
               "max_iters=15")
    assert on.returncode == 0, on.stderr
    assert last_step(runs / "t16") == 15

    # the data folder is prepared again from another text: was resumed on it without a word
    assert minlm(work, "prepare", "b.txt", *prep).returncode == 0
    refused = minlm(elsewhere, "train", f"out_dir={runs}", "run_name=t16", "resume=true",
                    "max_iters=20")
    assert refused.returncode == 2, refused.stdout + refused.stderr
    lines = refused.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot resume 't16'" in lines[0], refused.stderr
    assert "not the corpus it was trained on" in lines[0]
    assert "allow_data_change=true" in lines[0]
    assert last_step(runs / "t16") == 15  # nothing trained
    knowingly = minlm(elsewhere, "train", f"out_dir={runs}", "run_name=t16", "resume=true",
                      "max_iters=20", "allow_data_change=true")
    assert knowingly.returncode == 0, knowingly.stderr
    assert last_step(runs / "t16") == 20


def test_a_data_path_that_is_not_found_says_where_it_was_looked_for(tmp_path):
    done = minlm(tmp_path, "train", *TINY, "data=P16", f"out_dir={tmp_path}", "max_iters=2")
    assert done.returncode == 2
    assert f"a relative path is read from {tmp_path}" in done.stderr
    assert "give data=<the path to it>" in done.stderr
