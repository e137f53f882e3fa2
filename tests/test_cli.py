"""The command line as a person meets it: real processes (STYLE 15)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib
from pathlib import Path

from minlm.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]


def _run(*args: str, module: str = "minlm") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=120, cwd=ROOT)


def _commands(parser) -> dict:
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return sub.choices


def test_help_lists_every_command_the_tokenizer_ones_included():
    p = _run("--help")
    assert p.returncode == 0, p.stderr
    commands = _commands(build_parser())
    assert "tokenizer" in commands
    listed = {line.split()[0] for line in p.stdout.splitlines() if line.startswith("    ")}
    assert set(commands) <= listed, set(commands) - listed
    p = _run("tokenizer", "--help")
    assert p.returncode == 0 and "{train,measure}" in p.stdout
    # ``minlm`` (the installed script) is the same function as ``python -m minlm``
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["minlm"] == "minlm.cli:main"


def test_tokenizer_subcommand_and_module_run_the_same_function(tmp_path):
    text = tmp_path / "one.txt"
    text.write_text("Once upon a time there was a cat.\n\nThe cat sat on the mat.\n")
    outs = [_run("tokenizer", "measure", str(text), "tinystories-512"),
            _run("measure", str(text), "tinystories-512", module="minlm.tokenizer")]
    for p in outs:
        assert p.returncode == 0, p.stderr
    assert outs[0].stdout == outs[1].stdout and "| tinystories-512 | 512 |" in outs[0].stdout
    p = _run("tokenizer", "measure", str(tmp_path / "missing.txt"), "tinystories-512")
    assert p.returncode == 2
    assert p.stderr == f"error: data file {tmp_path / 'missing.txt'} does not exist\n"


def _dry_run(*args) -> dict:
    out = subprocess.run([sys.executable, "-m", "minlm", "train", *args, "--dry-run"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_preset_given_as_a_setting_builds_that_model():
    """``preset=mamba-1m`` like any other key=value used to build the default llama model
    (preset is also TrainConfig's record field) and record llama-1m."""
    resolved = _dry_run("preset=mamba-1m")
    assert resolved["model"]["mixer"] == "mamba" and resolved["train"]["preset"] == "mamba-1m"


def test_an_experiments_preset_is_found_once_the_experiment_is_named():
    resolved = _dry_run("--preset", "diffattn-1m", "experiment=diffattn")
    assert resolved["model"]["mixer"] == "diffattn"


def test_two_different_presets_are_refused():
    out = subprocess.run([sys.executable, "-m", "minlm", "train", "--preset", "griffin-1m",
                          "preset=mamba-1m", "--dry-run"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode != 0 and "disagree" in out.stderr


def test_trace_loads_the_experiment_before_its_preset():
    """`trace --preset diffattn-1m experiment=diffattn`: the preset exists only once the
    experiment is loaded, so the command loads it first, as `train` does."""
    p = _run("trace", "--preset", "diffattn-1m", "experiment=diffattn", "--tokens", "4",
             "--depth", "2")
    assert p.returncode == 0, p.stderr
    assert "diffattn-1m:" in p.stdout and "DiffAttention" in p.stdout
