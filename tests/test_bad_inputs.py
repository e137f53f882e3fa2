"""Bad input everywhere gets one clear line and a non-zero exit, never a traceback."""

import shutil
import subprocess
import sys

import pytest
import torch

from minlm.cli import main

TINY = ["--preset", "llama-0.5m", "vocab_size=512", "dim=32", "n_layers=1", "n_heads=2",
        "n_kv_heads=1", "block_size=32", "max_iters=2", "max_docs=50", "eval_iters=1",
        "eval_interval=2", "num_workers=1", "verbose=false"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A folder with good and broken runs and files, shared by every case."""
    root = tmp_path_factory.mktemp("bad")
    mp = pytest.MonkeyPatch()
    mp.setenv("MINLM_CACHE_DIR", str(root / "cache"))
    mp.setenv("MINLM_RUNS_DIR", str(root / "runs"))
    out = f"out_dir={root / 'runs'}"
    assert main(["train", *TINY, out, "run_name=good"]) == 0
    assert main(["train", *TINY, out, "run_name=gpt", "--preset", "gpt2-0.5m"]) == 0
    runs = root / "runs"
    shutil.copytree(runs / "good", runs / "no-weights")
    (runs / "no-weights" / "model.safetensors").unlink()
    shutil.copytree(runs / "good", runs / "torn-weights")
    (runs / "torn-weights" / "model.safetensors").write_bytes(b"\x00" * 100)
    shutil.copytree(runs / "good", runs / "bad-ckpt")
    for p in (runs / "bad-ckpt").glob("checkpoint-*.pt"):
        p.write_bytes(b"PK\x03\x04 this is not a checkpoint")
    shutil.copytree(runs / "good", runs / "bad-json")
    (runs / "bad-json" / "model_config.json").write_text("{not json")
    (root / "empty.txt").write_text("")
    (root / "binary.txt").write_bytes(bytes(range(256)) * 10)
    yield root
    mp.undo()


def _cases(root):
    out = f"out_dir={root / 'runs'}"
    return [
        (["train", "--preset", "llama-9m"], r"unknown preset 'llama-9m'; available presets: "),
        (["train", "dim=100", "n_heads=8"], r"dim=100 is not divisible by n_heads=8"),
        (["train", "lr=-1"], r"lr=-1.0 is invalid: must be > 0"),
        (["train", "learn_rate=1e-3"], r"unknown setting 'learn_rate'; model settings: vocab_size"),
        (["train", "lr"], r"override 'lr' is not of the form key=value"),
        (["train", "n_layers=four"], r"n_layers='four' is invalid: must be an integer"),
        (["train", "resume=true", "overwrite=true"], r"resume=True and overwrite=True contradict"),
        (["train", "max_iters=0"], r"max_iters=0 is invalid: must be a positive integer"),
        (["train", "dropout=1.5"], r"dropout=1.5 is invalid: must be in \[0, 1\)"),
        (["train", "position=sinusoid"], r"position='sinusoid' is invalid: must be one of"),
        (["train", "block_spec=norm>ffn>+"], r"unknown step 'ffn'; valid steps are"),
        (["train", "device=cuda"], r"device='cuda' is invalid: no CUDA device"),
        (["train", *TINY, out, "run_name=x1", f"data={root / 'missing.txt'}"], r"missing\.txt"),
        (["train", *TINY, out, "run_name=x2", f"data={root / 'empty.txt'}"], r"empty\.txt.*no documents"),
        (["train", *TINY, out, "run_name=x3", f"data={root / 'binary.txt'}"], r"binary\.txt.*not a UTF-8 text file"),
        (["train", *TINY, out, "run_name=x4", f"tokenizer={root / 'nope.model'}"], r"nope\.model"),
        (["train", *TINY, out, "run_name=x5", "tokenizer=tinystories-4096"], r"has 4096 tokens but vocab_size=512; set vocab_size >= 4096"),
        (["train", *TINY, out, "run_name=good"], r"run 'good' already exists .* resume=true .* overwrite=true"),
        (["train", *TINY, out, "run_name=good", "resume=true", "dim=64"], r"cannot resume 'good': the config differs .*dim: saved 32, given 64"),
        (["train", *TINY, out, "run_name=bad-ckpt", "resume=true"], r"no readable checkpoint in .*bad-ckpt"),
        (["train", "--preset", "llama-40m", "batch_size=100000"], r"out of memory training .* \(estimated .* GiB\); try batch_size=50000"),
        (["train", *TINY, out, "run_name=x6", "block_size=20000", "batch_size=1"], r"fewer than block_size\+1=20001"),
        (["generate", "nope", "Once"], r"no run folder 'nope' .*available runs: .*good"),
        (["generate", "no-weights", "Once"], r"no-weights is missing model\.safetensors"),
        (["generate", "torn-weights", "Once"], r"cannot load weights from .*torn-weights"),
        (["generate", "bad-json", "Once"], r"config JSON is not valid"),
        (["generate", "gpt", "Once upon a time " * 40], r"the prompt is \d+ tokens, longer than the context of 32 tokens"),
        (["trace", "--preset", "nope"], r"unknown preset 'nope'"),
        (["search", "dim=32,abc"], r"dim='abc' is invalid: must be an integer"),
        (["search", "widht=32,64"], r"unknown setting 'widht'"),
    ]


def test_at_least_25_bad_inputs_each_get_a_clear_error(world, capsys):
    cases = _cases(world)
    assert len(cases) >= 25
    for argv, message in cases:
        code = main(argv)
        err = capsys.readouterr().err
        assert code != 0, argv
        assert "Traceback" not in err, (argv, err)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, (argv, err)
        import re

        assert re.search(message, lines[0]), (argv, lines[0])


def test_a_real_process_exits_non_zero_without_traceback():
    p = subprocess.run([sys.executable, "-m", "minlm", "train", "dim=100", "n_heads=8"],
                       capture_output=True, text=True)
    assert p.returncode == 2
    assert p.stderr.strip().startswith("error: dim=100 is not divisible by n_heads=8")
    assert "Traceback" not in p.stderr
    p = subprocess.run([sys.executable, "-m", "minlm", "--debug", "train", "dim=100", "n_heads=8"],
                       capture_output=True, text=True)
    assert p.returncode != 0 and "Traceback" in p.stderr  # --debug shows it


class Boom:
    def __reduce__(self):
        return (print, ("this code ran while loading a checkpoint",))


def test_checkpoint_with_pickled_code_is_refused(world, capsys):
    from minlm.runs import RunError, load_checkpoint

    run = world / "runs" / "evil"
    run.mkdir()
    torch.save({"step": 1, "payload": Boom()}, run / "checkpoint-00000001.pt")
    with pytest.raises(RunError, match="no readable checkpoint"):
        load_checkpoint(run, log=lambda *_: None)
    assert "this code ran" not in capsys.readouterr().out
