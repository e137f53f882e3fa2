"""The command line as a person meets it: real processes (STYLE 15)."""

from __future__ import annotations

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
