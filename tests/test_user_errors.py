"""Input that used to end in the catch-all ``error: unexpected TypeError`` (a command-line
value, an experiment's file) now gets one line naming the input, the value and the fix; the
catch-all, kept for real bugs, says how to report one."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from minlm.errors import report_errors


def _minlm(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINLM_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "minlm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


BROKEN = {
    "syntax.py": "from minlm.modules import registry\n\ndef oops(:\n    pass\n",
    "name.py": "import math\n\nVALUE = math.pi\nOTHER = undefined_name + 1\n",
}


@pytest.mark.parametrize("args, message", [
    (["--preset", "mamba-1m", 'mixer_options={"d_state": "big"}'],
     r"mixer_options d_state='big' is invalid: must be of type int \(default 16\)"),
    (["--preset", "mamba-1m", 'mixer_options={"expand": null}'],
     r"mixer_options expand=None is invalid: must be of type int"),
    (['tied_blocks={"3": [0]}'], r"tied_blocks=\{'3': \[0\]\} is invalid: values must be block "
     r"indices"),
    (["block_spec="], r"block_spec='' is empty; e\.g\. 'norm>attn>\+ norm>mlp>\+'"),
    (["experiment={tmp}/syntax.py"],
     r"experiment='.*syntax\.py': .*syntax\.py:3: invalid syntax \(a syntax error in the "
     r"experiment's code"),
    (["experiment={tmp}/name.py"],
     r"experiment='.*name\.py' failed while importing, at .*name\.py:4: NameError: name "
     r"'undefined_name' is not defined; fix the experiment's code"),
])
def test_bad_values_name_the_input(args, message, tmp_path):
    for name, text in BROKEN.items():
        (tmp_path / name).write_text(text)
    args = [a.replace("{tmp}", str(tmp_path)) for a in args]
    done = _minlm(["train", *args, "--dry-run"], tmp_path)
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert "unexpected" not in done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    assert __import__("re").search(message, lines[0]), lines[0]


def test_the_catch_all_says_it_is_a_bug_and_how_to_report_it(capsys):
    def bug():
        raise TypeError("a bug")
    assert report_errors(bug) == 1
    err = capsys.readouterr().err
    assert "unexpected TypeError: a bug" in err and "bug in minlm" in err and "--debug" in err
