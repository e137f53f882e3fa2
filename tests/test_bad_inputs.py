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
    _issue17_world(root)
    yield root
    mp.undo()


def _issue17_world(root):
    """Broken runs and files for the cases of issue 17."""
    import json

    runs = root / "runs"
    shutil.copytree(runs / "good", runs / "mismatch")  # config edited after training
    cfg = json.loads((runs / "mismatch" / "model_config.json").read_text())
    (runs / "mismatch" / "model_config.json").write_text(json.dumps({**cfg, "dim": 48}))
    shutil.copytree(runs / "good", runs / "torn-train")
    (runs / "torn-train" / "train_config.json").write_text('{"run_name": "torn-tr')
    shutil.copytree(runs / "good", runs / "list-train")
    (runs / "list-train" / "train_config.json").write_text("[1, 2]")
    (runs / "not-a-run").mkdir()  # holds a model_config.json, but it is someone's folder
    shutil.copy(runs / "good" / "model_config.json", runs / "not-a-run")
    (runs / "not-a-run" / "precious.txt").write_text("keep me")
    chat = [{"messages": [{"role": "user", "content": f"What colour is the {t}?"},
                          {"role": "assistant", "content": f"The {t} is {c}."}]}
            for t, c in [("sky", "blue"), ("grass", "green"), ("sun", "yellow")] * 4]
    (root / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chat))
    users = [{"messages": [m for m in c["messages"] if m["role"] == "user"]} for c in chat]
    (root / "allusers.jsonl").write_text("".join(json.dumps(c) + "\n" for c in users))
    (root / "one.txt").write_text("Once upon a time there was one story and no other.\n")
    story = "Once upon a time a cat sat on a mat and looked at the sun.\n\n"
    (root / "nul.txt").write_text(story * (70_000 // len(story)) + "A bad\x00document.\n")
    (root / "datafile.txt").write_text(story)


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
        (["train", "position=sinusoid"], r"position='sinusoid' is not a registered positional scheme; registered: alibi, "),
        (["train", "block_spec=norm>ffn>+"], r"unknown step 'ffn'; valid steps are"),
        (["train", "mixer=gru"], r"mixer='gru' is not a registered token mixer; registered: attention"),
        (["train", "experiment=nope"], r"experiment='nope' is neither a folder of .*available: diffattn"),
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
        (["export", "nope", "--out", str(root / "exp")], r"no run folder 'nope'"),
        (["export", "gpt", "--format", "gguf", "--out", str(root / "gpt.gguf")],
         r"cannot export gpt: n_kv_heads=1 has no counterpart in transformers' GPT2LMHeadModel"),
        (["import", str(root / "missing")], r"missing is not a folder"),
        (["import", str(root / "missing"), "--name", "../escape"], r"name='\.\./escape' is invalid"),
        (["import", str(root)], r"has no config\.json; it is not a Hugging Face checkpoint"),
        (["trace", "--run", "nope"], r"no run folder 'nope'"),
        (["prepare", str(root / "empty.txt"), "--tokenizer", "tinystories-512"], r"empty\.txt holds no documents"),
        (["prepare", str(root), "--tokenizer", "tinystories-512"], r"mixes formats \(\.json e\.g\. .*\.txt e\.g\. "),
        *_issue17_cases(root),
    ]


def _issue17_cases(root):
    """Issue 17: (argv, message, env) of each case; every one exits 2 and writes nothing."""
    out, chat = f"out_dir={root / 'runs'}", str(root / "chat.jsonl")
    search = ["search", "--preset", "llama-0.5m", out, "dim=32,64"]
    cases = [
        # 17.1: every name that becomes a folder goes through TrainConfig's run_name check
        (["sft", "good", "--data", chat, "run_name=../../esc-sft"],
         r"run_name='\.\./\.\./esc-sft' is invalid: must be a plain folder name"),
        (["sft", "good", "--data", chat, f"run_name={root / 'abs-sft'}"],
         r"run_name='/.*abs-sft' is invalid: must be a plain folder name"),
        (["dpo", "good", "run_name=.."], r"run_name='\.\.' is invalid: must be a plain folder"),
        ([*search, "--name", "../../esc-search"],
         r"--name='\.\./\.\./esc-search' is invalid: must be a plain folder name"),
        ([*search, "--name", str(root / "abs-search")], r"--name='/.*abs-search' is invalid"),
        (["train", out, f"run_name={root / 'abs-train'}"], r"run_name='/.*abs-train' is invalid"),
        (["sft", "good", "--data", chat, "run_name=not-a-run", "overwrite=true", "device=cpu"],
         r"refusing to overwrite .*not-a-run: it does not look like a run folder"),
        # 17.3
        (["train", out, "run_name=nope", "resume=true"],
         r"cannot resume 'nope': there is no run of that name in .*runs; runs there: .*good"),
        (["train", out, "resume=true"],
         r"resume=true needs run_name=<the run to continue>; runs in .*runs: .*good"),
        # 17.8: an existing run is refused before the corpus is read (here: a missing one)
        (["train", *TINY, out, "run_name=good", f"data={root / 'missing.txt'}"],
         r"run 'good' already exists"),
        # 17.7
        (["generate", "mismatch", "Once"],
         r"cannot load weights from .*mismatch.*: model_config\.json does not match the weights "
         r"\(shapes differ: embed.*file \[512, 32\], config \[512, 48\]"),
        (["generate", "torn-train", "Once"],
         r"torn-train/train_config\.json: config JSON is not valid \(.*\); the file is torn"),
        (["generate", "list-train", "Once"],
         r"list-train/train_config\.json: config JSON is not valid: it holds a list"),
        (["generate", "good", "bad \udcff prompt"],
         r"the text is not valid UTF-8 \(undecodable bytes at character 4"),
        (["train", "hidden_mult=nan"], r"hidden_mult=nan is invalid: must be a finite number"),
        (["train", "lr=inf"], r"lr=inf is invalid: must be a finite number"),
        (["train", "norm_eps=nan"], r"norm_eps=nan is invalid: must be a finite number"),
        (["train", *TINY, out, "run_name=x7"],
         r"MINLM_DATA_DIR=.*datafile\.txt is a file; point it at the folder",
         {"MINLM_DATA_DIR": str(root / "datafile.txt")}),
        (["train", *TINY, out, "run_name=x8", f"data={root / 'one.txt'}"],
         r"1 document cannot be split into train and validation; add documents"),
        (["sft", "good", "--data", str(root / "allusers.jsonl"), "device=cpu"],
         r"no conversation has a turn to learn from"),
        # 17.9
        (["train", *TINY, out, "run_name=x9", "max_docs=0", f"data={root / 'nul.txt'}"],
         r"nul\.txt is not a UTF-8 text file \(document \d+ holds NUL bytes"),
        (["train", "max_minutes=nan"], r"max_minutes=nan is invalid: must be a finite number"),
        (["train", "grad_clip=nan"], r"grad_clip=nan is invalid: must be a finite number"),
        (["convert", chat, str(root / "new-folder" / "out.txt")],
         r"cannot write .*out\.txt: use a \.jsonl, \.json or \.parquet name"),
        (["generate", "good", "Once", "--top-p", "2"], r"top_p=2\.0 is invalid"),
    ]
    if not torch.cuda.is_available():
        cases.append((["generate", "good", "Once", "--device", "cuda"],
                      r"device='cuda' is invalid: no CUDA device is available"))
    return cases


def _tree(root):
    """Every file and folder under ``root`` (the tokenization cache aside) with its size and
    modification time: what an error must leave exactly as it was."""
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in root.rglob("*") if "cache" not in p.relative_to(root).parts}


def test_at_least_25_bad_inputs_each_get_a_clear_error(world, capsys, monkeypatch):
    """Each case: exit code 2, one ``error:`` line matching, no traceback, nothing printed on
    stdout, and no file or folder written, changed or deleted anywhere (nor outside)."""
    import re

    cases = _cases(world)
    assert len(cases) >= 50
    for argv, message, *env in cases:
        before = _tree(world)
        with monkeypatch.context() as m:
            for k, v in (env[0] if env else {}).items():
                m.setenv(k, v)
            code = main(argv)
        out, err = capsys.readouterr()
        assert code == 2, (" ".join(argv), code, err)
        assert "Traceback" not in err, (argv, err)
        lines = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(lines) == 1, (argv, err)
        assert re.search(message, lines[0]), (argv, lines[0])
        if argv[0] != "train":  # train may print its progress before a late error
            assert out == "", (argv, out)
        assert _tree(world) == before, argv
    for escaped in ("esc-sft", "esc-search"):
        assert not (world.parent / escaped).exists()
    assert (world / "runs" / "not-a-run" / "precious.txt").read_text() == "keep me"


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
    with pytest.raises(RunError, match="no readable checkpoint") as e:
        load_checkpoint(run, log=lambda *_: None)
    assert "loading them could run code" in str(e.value)
    assert "weights_only" not in str(e.value)  # torch's advice is the unsafe step
    assert "this code ran" not in capsys.readouterr().out


# --- issue 17, as a person meets it: real processes, real signals, a real file size limit ---

def _env(root, **extra):
    import os

    return {**os.environ, "MINLM_RUNS_DIR": str(root / "runs"), "MINLM_CACHE_DIR":
            str(root / "cache"), "OMP_NUM_THREADS": "1", **extra}


def _minlm(root, *args, module="minlm", **kw):
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True,
                          env=_env(root), timeout=300, **kw)


def test_real_processes_refuse_bad_arguments_in_one_line(world):
    p = _minlm(world, "eval", "good", "--data", str(world / "one.txt"), "--max-docs", "-1")
    assert p.returncode == 2 and b"argument --max-docs: -1 is invalid: must be >= 0" in p.stderr
    assert b"Traceback" not in p.stderr
    p = _minlm(world, "generate", "good", b"Once \xff\xfe upon")  # bytes that are not UTF-8
    assert p.returncode == 2 and p.stdout == b""
    assert p.stderr.startswith(b"error: the text is not valid UTF-8"), p.stderr
    p = _minlm(world, "measure", str(world / "missing.txt"), "tinystories-512",
               module="minlm.tokenizer")
    assert p.returncode == 2, p.stderr
    assert p.stderr.decode() == f"error: data file {world / 'missing.txt'} does not exist\n"
    p = _minlm(world, "--debug", "measure", "nope.txt", "tinystories-512", module="minlm.tokenizer")
    assert p.returncode != 0 and b"Traceback" in p.stderr


def test_chat_refuses_a_line_that_is_not_utf8_and_goes_on(world):
    p = _minlm(world, "chat", "good", "--max-new-tokens", "4", "--seed", "0",
               input=b"bad \xff\xfe line\nhello\n/quit\n")
    assert p.returncode == 0, p.stderr
    assert b"error: that message is not valid UTF-8" in p.stderr and b"not sent" in p.stderr
    assert p.stdout.count(b"assistant> ") == 1  # the good line was answered
    assert b"Traceback" not in p.stderr


def test_search_where_every_candidate_is_skipped_exits_1(world):
    p = _minlm(world, "search", *TINY, f"out_dir={world / 'runs'}", "--name", "all-skipped",
               "dim=32,64", "--max-params", "10", "--rungs", "1")
    assert p.returncode == 1, p.stderr
    assert p.stderr.decode().strip().splitlines()[-1] == (
        "error: no candidate trained: all 2 were skipped or failed (reasons in the table above)")


def test_the_result_line_is_printed_once(world):
    p = _minlm(world, "train", *TINY, f"out_dir={world / 'runs'}", "run_name=once",
               "verbose=true")
    assert p.returncode == 0, p.stderr
    said = [line for line in p.stdout.decode().splitlines()
            if line.startswith(f"run {world / 'runs' / 'once'}: step 2,")]
    assert len(said) == 1, p.stdout


def test_ctrl_c_saves_exits_130_and_says_how_to_resume(world):
    import json
    import signal
    import time

    run = world / "runs" / "sigint"
    proc = subprocess.Popen(
        [sys.executable, "-m", "minlm", "train", *TINY, f"out_dir={world / 'runs'}",
         "run_name=sigint", "max_iters=100000", "log_interval=1", "eval_interval=100000",
         "checkpoint_interval=100000"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        env=_env(world))
    deadline = time.time() + 120
    while time.time() < deadline and not (
            (run / "log.csv").exists() and len((run / "log.csv").read_text().splitlines()) > 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    step = json.loads((run / "train_config.json").read_text())["meta"]["status"]
    assert step.startswith("stopped at step ") and step.endswith("interrupted (Ctrl-C)")
    n = int(step.split()[3].rstrip(":"))
    assert (f"stopped at step {n}: interrupted (Ctrl-C); the state saved is in {run}; continue "
            f"it with: python -m minlm train run_name=sigint out_dir={run.parent} resume=true"
            in err.decode()), err
    assert (run / f"checkpoint-{n:08d}.pt").exists() and b"Traceback" not in err
    p = _minlm(world, "train", f"out_dir={run.parent}", "run_name=sigint", "resume=true",
               f"max_iters={n + 1}")
    assert p.returncode == 0, p.stderr
    assert json.loads((run / "train_config.json").read_text())["meta"]["status"] == "finished"


def test_a_checkpoint_that_does_not_fit_fails_clearly_and_leaves_no_torn_file(world):
    import resource

    def limit_file_size():  # what ``ulimit -f`` does; SIGXFSZ is ignored by Python itself
        resource.setrlimit(resource.RLIMIT_FSIZE, (150_000, 150_000))

    run = world / "runs" / "full-disk"
    p = subprocess.run([sys.executable, "-m", "minlm", "train", *TINY,
                        f"out_dir={world / 'runs'}", "run_name=full-disk"], capture_output=True,
                       env=_env(world), timeout=300, preexec_fn=limit_file_size)
    assert p.returncode == 1, p.stderr  # the engine's rule: a checkpoint not written fails the run
    assert (f"error: the run failed at step 2: could not write the checkpoint "
            f"{run / 'checkpoint-00000002.pt'}: the file size limit was reached (ulimit -f: "
            "150,000 bytes;") in p.stderr.decode(), p.stderr
    assert b"inline_container" not in p.stderr and b"Traceback" not in p.stderr
    assert not list(run.glob("checkpoint-*")) and not list(run.glob(".*.tmp"))


def test_sft_accepts_the_skip_invalid_flag_its_errors_suggest(world, capsys):
    import json

    bad = world / "bad-chat.jsonl"
    bad.write_text((world / "chat.jsonl").read_text() + '{"messages": [{"role": "user"}]}\n')
    argv = ["sft", "good", "--data", str(bad), "run_name=skipped", "max_steps=1",
            "verbose=false", "device=cpu"]
    assert main(argv) == 2
    assert "--skip-invalid" in capsys.readouterr().err
    assert main([*argv, "--skip-invalid"]) == 0
    meta = json.loads((world / "runs" / "skipped" / "train_config.json").read_text())["meta"]
    assert meta["data_meta"]["skipped_malformed"] == 1


def test_every_file_of_a_run_has_the_same_permissions(world):
    import os

    mask = os.umask(0)
    os.umask(mask)
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in (world / "runs" / "good").iterdir()}
    assert set(modes.values()) == {oct(0o666 & ~mask)}, modes


def test_ctrl_c_during_sft_saves_and_exits_130(world):
    import json
    import signal
    import threading
    import time

    run = world / "runs" / "sft-sigint"
    proc = subprocess.Popen(
        [sys.executable, "-m", "minlm", "sft", "good", "--data", str(world / "chat.jsonl"),
         "run_name=sft-sigint", "epochs=3000", "val_fraction=0", "device=cpu"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env(world))
    seen = []  # the progress bar (stderr) shows that the loop has started

    def read():
        while chunk := proc.stderr.read1(4096):
            seen.append(chunk)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    deadline = time.time() + 120
    while time.time() < deadline and b"step/s" not in b"".join(seen):
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    proc.wait(timeout=120)
    reader.join(timeout=10)
    err = b"".join(seen).decode()
    assert proc.returncode == 130, err[-2000:]
    status = json.loads((run / "train_config.json").read_text())["meta"]["status"]
    assert status.startswith("stopped at step ") and status.endswith("interrupted (Ctrl-C)")
    assert "interrupted (Ctrl-C); the state saved is in" in err and "Traceback" not in err
    assert (run / "model.safetensors").exists()
