"""The one rule for outputs the user names (``minlm.outputs``), as a person meets it: real
``python -m minlm`` processes, the folder tree compared before and after each (nothing the
user wrote may be gone or changed)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SMALL = "".join(f"Once upon a time a cat named Tom{i} found a red ball.\n\nThe dog ran home.\n\n"
                for i in range(40))


def tree(root: Path) -> dict[str, str]:
    """Every file under ``root`` (relative path) -> sha256 of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def kept(before: dict, after: dict) -> list[str]:
    """Files of ``before`` that are gone or changed in ``after`` (empty: nothing lost)."""
    return [k for k, v in before.items() if after.get(k) != v]


def minlm(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINLM_CACHE_DIR": str(cwd / ".cache")}
    env.pop("MINLM_RUNS_DIR", None)
    return subprocess.run([sys.executable, "-m", "minlm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


@pytest.fixture
def lab(tmp_path) -> Path:
    """A working folder: two runs under trained_models/ and a note of the user's."""
    runs = tmp_path / "trained_models"
    runs.mkdir()
    shutil.copytree(REPO / "trained_models" / "llama-1m", runs / "base")
    shutil.copytree(REPO / "trained_models" / "llama-0.5m", runs / "other")
    (tmp_path / "notes.txt").write_text("my notes\n")
    return tmp_path


def refused(done: subprocess.CompletedProcess, *words: str) -> None:
    assert done.returncode == 2, done.stdout + done.stderr
    # progress bars (tqdm's lines, carriage returns) are not messages
    lines = [line for line in done.stderr.replace("\r", "\n").splitlines()
             if line.strip() and not re.search(r"\d+%\|", line)]
    assert len(lines) == 1 and lines[0].startswith("error: "), done.stderr
    for w in words:
        assert w in lines[0], lines[0]


pytest.importorskip("transformers", reason="export needs requirements-dev.txt")


@pytest.mark.parametrize("out, words", [
    ("trained_models", ["--out trained_models", "holding the source"]),  # was: every run gone
    ("trained_models/base", ["--out trained_models/base is the source"]),  # was: replaced
    (".", ["--out . is the current directory"]),  # was: Errno 22, the folder emptied
    ("notes.txt", ["minlm did not write that file"]),
])
def test_export_overwrite_refuses_what_minlm_did_not_export(lab, out, words):
    before = tree(lab)
    refused(minlm(lab, "export", "base", "--format", "hf", "--out", out, "--overwrite"), *words)
    assert kept(before, tree(lab)) == []
    assert sorted(p.name for p in lab.iterdir()) == ["notes.txt", "trained_models"]


def test_export_overwrite_refuses_a_folder_of_other_runs_and_another_run(lab):
    """Not the source, but still a folder of runs, and a run: refused too."""
    shutil.copytree(lab / "trained_models", lab / "archive")
    before = tree(lab)
    refused(minlm(lab, "export", "base", "--format", "hf", "--out", "archive", "--overwrite"),
            "minlm did not write that folder")
    refused(minlm(lab, "export", "base", "--format", "gguf", "--out", "trained_models/other",
                  "--overwrite"), "is a run folder")
    assert kept(before, tree(lab)) == []


def test_a_second_export_replaces_the_first_and_only_that(lab):
    assert minlm(lab, "export", "base", "--format", "hf", "--out", "exp").returncode == 0
    mark = json.loads((lab / "exp" / "minlm-output.json").read_text())
    assert mark["kind"] == "hf-export" and mark["source"] == "trained_models/base"
    first = tree(lab / "exp")
    refused(minlm(lab, "export", "base", "--format", "hf", "--out", "exp"), "--overwrite")
    done = minlm(lab, "export", "base", "--format", "hf", "--out", "exp", "--overwrite")
    assert done.returncode == 0, done.stderr
    assert set(tree(lab / "exp")) == set(first)
    assert not [p for p in lab.iterdir() if p.name.startswith(".exp")]  # no temp left over
    (lab / "exp" / "mine.txt").write_text("added by me")  # the user keeps a file in it
    before = tree(lab)
    refused(minlm(lab, "export", "base", "--format", "hf", "--out", "exp", "--overwrite"),
            "it holds mine.txt")
    assert kept(before, tree(lab)) == []
    # a GGUF file is marked in its own header: a second export replaces it, a gguf of
    # someone else's (here: the user's notes under that name) is refused
    pytest.importorskip("gguf")
    assert minlm(lab, "export", "base", "--format", "gguf", "--out", "m.gguf").returncode == 0
    done = minlm(lab, "export", "base", "--format", "gguf", "--out", "m.gguf", "--overwrite")
    assert done.returncode == 0, done.stderr
    (lab / "theirs.gguf").write_bytes(b"GGUF not minlm's")
    refused(minlm(lab, "export", "base", "--format", "gguf", "--out", "theirs.gguf",
                  "--overwrite"), "minlm did not write that file")
    assert (lab / "theirs.gguf").read_bytes() == b"GGUF not minlm's"


def test_prepare_out_refuses_a_folder_holding_the_users_files(lab):
    """Was: exit 0, firmware.bin deleted and meta.json overwritten."""
    (lab / "small.txt").write_text(SMALL)
    d = lab / "DIR"
    d.mkdir()
    (d / "firmware.bin").write_bytes(b"\x7fELF firmware")
    (d / "meta.json").write_text('{"board": "rev2"}\n')
    (d / "notes.txt").write_text("do not lose\n")
    before = tree(lab)
    refused(minlm(lab, "prepare", "small.txt", "--tokenizer", "tinystories-512", "--out", "DIR",
                  "--workers", "1"), "--out DIR", "minlm did not write that folder",
            "name a new path")
    assert kept(before, tree(lab)) == []
    assert sorted(p.name for p in d.iterdir()) == ["firmware.bin", "meta.json", "notes.txt"]
    # the source's own folder and the current directory are refused the same way
    refused(minlm(lab, "prepare", "small.txt", "--tokenizer", "tinystories-512", "--out", ".",
                  "--workers", "1"), "current directory")
    assert kept(before, tree(lab)) == []


def test_prepare_out_rewrites_its_own_folder_whole(lab):
    (lab / "small.txt").write_text(SMALL)
    args = ["prepare", "small.txt", "--tokenizer", "tinystories-512", "--out", "shards",
            "--workers", "1"]
    assert minlm(lab, *args, "--shard-tokens", "200").returncode == 0
    assert len(list((lab / "shards").glob("train-*.bin"))) > 1
    done = minlm(lab, *args)  # other options: the earlier prepare is replaced, not mixed in
    assert done.returncode == 0, done.stderr
    assert sorted(p.name for p in (lab / "shards").iterdir()) == [
        "meta.json", "minlm-output.json", "train.bin", "val.bin"]
    assert sorted(p.name for p in lab.iterdir()) == ["notes.txt", "shards", "small.txt",
                                                    "trained_models"]  # no lock, no temp


def test_search_and_train_refuse_folders_they_did_not_write(lab):
    """A search named after a run (its study would go into the run folder), and a run
    replaced with overwrite=true from inside it (the current directory)."""
    before = tree(lab)
    tiny = ["--preset", "llama-0.5m", "vocab_size=512", "dim=32", "n_layers=1", "n_heads=2",
            "n_kv_heads=1", "block_size=32", "max_iters=2", "max_docs=50", "num_workers=1"]
    refused(minlm(lab, "search", "--name", "base", "--rungs", "1", *tiny, "lr=1e-3,2e-3"),
            "search folder trained_models/base is a run folder")
    base = lab / "trained_models" / "base"
    refused(minlm(base, "train", *tiny, "out_dir=..", "run_name=base", "overwrite=true"),
            "current directory")
    assert kept(before, tree(lab)) == []


def test_a_full_disk_and_a_read_only_target_are_one_line_naming_the_given_path(lab,
                                                                             shared_data):
    """Was: "91525 requested and 43398 written" (prepare), "unexpected SafetensorError" (HF
    export), "524288 requested and 832 written" (GGUF); a read-only --out named by its
    temporary path."""
    from test_faults import try_mount_tmpfs

    disk, ro = lab / "disk", lab / "ro"
    if not try_mount_tmpfs(disk, "512k"):
        pytest.skip("needs root to mount a small tmpfs")
    try:
        assert try_mount_tmpfs(ro, "1m")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        before = tree(lab)
        big = shared_data / "shakespeare" / "input.txt"
        cases = [
            (["prepare", str(big.resolve()), "--tokenizer", "tinystories-512", "--out",
              "disk/shk", "--workers", "1"], "cannot write disk/shk: the disk is full"),
            (["export", "base", "--format", "hf", "--out", "disk/hf"],
             "cannot write disk/hf: the disk is full"),
            (["export", "base", "--format", "gguf", "--out", "disk/m.gguf"],
             "cannot write disk/m.gguf: the disk is full"),
            (["export", "base", "--format", "hf", "--out", "ro/hf"],
             "cannot write ro/hf: Read-only file system in ro; choose a folder you can write"),
        ]
        for args, words in cases:
            refused(minlm(lab, *args), words, "free some space" if "full" in words else "")
            assert sorted(p.name for p in disk.iterdir()) == []  # no temp left behind
        assert kept(before, tree(lab)) == []
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
        subprocess.run(["umount", "-l", str(ro)], check=False)
