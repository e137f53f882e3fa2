"""The models shipped in trained_models/: small, loadable, documented, and the README's first
command generates from one with no data and no training."""

import os
import subprocess
import sys

from pathlib import Path

import pytest

from minlm.runs import absolute_paths, load_run

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p.parent for p in (REPO / "trained_models").glob("*/model.safetensors"))


def test_llama_1m_is_shipped():
    assert "llama-1m" in [p.name for p in SHIPPED]


@pytest.mark.parametrize("run_dir", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_is_small_loadable_and_documented(run_dir):
    assert (run_dir / "model.safetensors").stat().st_size < 10 * 2**20
    assert "## Samples" in (run_dir / "README.md").read_text()
    run = load_run(run_dir)
    assert run.meta["params"] == run.model.num_params()


def test_readme_first_command_generates_without_data(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("MINLM_")}
    env["HOME"] = str(tmp_path)  # no cache, no downloaded data
    p = subprocess.run([sys.executable, "-m", "minlm", "generate", "llama-1m", "Once upon a time",
                        "--max-new-tokens", "12", "--seed", "0"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("Once upon a time") and len(p.stdout.split()) > 6
    assert not (tmp_path / ".cache").exists()


def test_no_shipped_file_records_an_absolute_path():
    """A run folder travels: nothing in it may name the machine that trained it."""
    import csv
    import json
    import re

    found = []
    for path in sorted((REPO / "trained_models").rglob("*")):
        if path.suffix == ".json":
            found += [(path, p) for p in absolute_paths(json.loads(path.read_text()))]
        elif path.suffix == ".csv":
            with open(path, newline="") as f:
                found += [(path, c) for row in csv.reader(f) for c in absolute_paths(row)]
        elif path.suffix == ".md":
            found += [(path, m) for m in re.findall(r"(?<![\w:/.~])/[\w.-]+/[\w./-]*",
                                                    path.read_text())]
    assert not found, found


def test_absolute_paths_are_found_where_they_would_hide():
    assert absolute_paths({"a": [{"b": "/work/runs"}], "c": "tinystories/train.txt"}) == ["/work/runs"]
