"""What a newcomer meets on the README's path (issue 32): the main command trains the shipped
recipe and says what to try next, honest figures after a stop, one clear line where a setting
would surprise, and the small things a person sees (emoji, chat warnings, file modes)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from minlm import ModelConfig, TrainConfig
from minlm.train import StopFlag, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _cli(*args: str, cwd: Path = REPO, stdin: str | None = None, code: str | None = None,
         timeout: int = 300) -> subprocess.CompletedProcess:
    """``python -m minlm ...`` in a real process (or ``python -c code`` that calls it)."""
    cmd = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "minlm", *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, input=stdin,
                          env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=timeout)


TINY = ["dim=32", "n_layers=1", "n_heads=2", "n_kv_heads=1", "block_size=32", "batch_size=2",
        "eval_iters=1", "max_docs=200", "log_interval=1"]


def test_the_readme_recipe_is_the_shipped_llama_1m_recipe():
    """Regression: the README's main job trained vocabulary 2048 with the old recipe while
    the shipped llama-1m is the speedrun recipe; `--recipe speedrun` gives exactly its model
    and the settings that decide its training."""
    p = _cli("train", "--recipe", "speedrun", "max_minutes=5", "--dry-run")
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    shipped_model = json.loads((REPO / "trained_models/llama-1m/model_config.json").read_text())
    shipped_train = json.loads((REPO / "trained_models/llama-1m/train_config.json").read_text())
    assert got["model"] == shipped_model
    for key in ("optimizer", "lr", "warmup_iters", "batch_size", "schedule", "decay_frac",
                "min_lr_ratio", "preset"):
        assert got["train"][key] == shipped_train[key], key
    assert got["train"]["max_minutes"] == 5
    readme = (REPO / "README.md").read_text()
    assert "python -m minlm train --recipe speedrun max_minutes=5" in readme


def test_a_bad_recipe_name_says_which_exist():
    p = _cli("train", "--recipe", "nope", "--dry-run")
    assert p.returncode == 2
    assert p.stderr.strip().splitlines() == [p.stderr.strip()]
    assert "--recipe 'nope' is not in" in p.stderr and "speedrun" in p.stderr


def test_the_main_job_ends_with_the_next_commands_and_warns_of_an_all_warmup_run(tmp_path):
    """After training: the generate and compare commands to try, with the shipped llama-1m.
    max_iters below the default 100 warm-up steps: one line says the run is all warm-up."""
    p = _cli("train", "--recipe", "speedrun", "max_iters=6", *TINY, "run_name=r",
             f"out_dir={tmp_path}")
    assert p.returncode == 0, p.stderr
    out = p.stdout + p.stderr
    assert out.count("warmup_iters=50 >= max_iters=6") == 1, out
    assert "set warmup_iters=1" in out
    assert f"python -m minlm generate {tmp_path / 'r'} \"Once upon a time\"" in p.stdout
    assert f"python -m minlm compare {tmp_path / 'r'} trained_models/llama-1m" in p.stdout
    p = _cli("train", "--recipe", "speedrun", "max_iters=60", "warmup_iters=5", *TINY,
             "run_name=s", f"out_dir={tmp_path}", "eval_interval=1000")
    assert p.returncode == 0 and "warm-up" not in p.stdout + p.stderr


def test_a_time_budget_evaluates_often_enough_for_a_curve(tmp_path, shard_cache):
    """Regression: a 5-minute run got two evaluations (eval_interval=200 steps), so compare
    drew it as two dots; a time budget also evaluates every twentieth of it."""
    from minlm.runs import read_log

    model = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=1,
                                    n_heads=2, n_kv_heads=1, block_size=32)
    cfg = TrainConfig(run_name="t", out_dir=str(tmp_path), max_iters=100000, max_minutes=0.1,
                      batch_size=2, eval_iters=1, max_docs=200, verbose=False, warmup_iters=2)
    result = train(model, cfg)
    assert result.stopped.startswith("time budget")
    evals = read_log(result.run_dir)["val_bpb"].dropna()
    assert len(evals) >= 10, len(evals)


def test_a_stop_right_after_a_resume_reports_the_last_evaluation(tmp_path, shard_cache):
    """Regression: the widget said "no evaluation yet" after a resume while its plot showed
    the run's validation points."""
    model = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=1,
                                    n_heads=2, n_kv_heads=1, block_size=32)
    cfg = TrainConfig(run_name="r", out_dir=str(tmp_path), max_iters=8, batch_size=2,
                      eval_interval=4, eval_iters=1, max_docs=200, verbose=False, warmup_iters=2)
    first = train(model, cfg)
    flag = StopFlag()
    flag.set("Stop button pressed")  # pressed before the resumed run's first step
    again = train(model, cfg.replace(resume=True, max_iters=20), stop=flag)
    assert again.step == first.step == 8
    assert again.val_bpb == pytest.approx(first.val_bpb)
    assert "no evaluation yet" not in str(again) and "val bits/byte" in str(again)


def test_an_emoji_shows_as_itself_in_the_coloured_tokens():
    """Regression: the sampler showed an emoji prompt as <0xF0><0x9F>...; a run of byte
    pieces is shown as the characters its bytes spell (its ids in the title)."""
    from minlm.tokenizer import load_tokenizer

    tok = load_tokenizer("tinystories-512")
    shown = tok.display("A 🎈 for Tom")
    assert "[<0xF0>][<0x9F>][<0x8E>][<0x88>]" in str(shown)  # printing still shows the pieces
    page = shown._repr_html_()
    assert "🎈" in page and "&lt;0x" not in page and "4 byte tokens" in page
    assert f"<small>{len(shown)} tokens</small>" in page


def test_chat_with_a_run_that_is_not_chat_tuned_says_so():
    p = _cli("chat", "llama-1m", "--max-new-tokens", "4", stdin="Hello\n/quit\n")
    assert p.returncode == 0, p.stderr
    assert "llama-1m was not chat-tuned" in p.stderr and "python -m minlm sft llama-1m" in p.stderr
    p = _cli("chat", "llama-1m-chat", "--max-new-tokens", "4", stdin="Hello\n/quit\n")
    assert p.returncode == 0 and "not chat-tuned" not in p.stderr


def test_an_exported_model_follows_the_umask(tmp_path):
    """Regression: model.safetensors of an export was 0600 (safetensors writes through a
    private temp file); files follow the umask, as every other file minlm writes."""
    pytest.importorskip("transformers")
    code = ("import os, sys; os.umask(0o022); from minlm.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    p = _cli("export", "llama-1m", "--format", "hf", "--out", str(tmp_path / "hf"), code=code)
    assert p.returncode == 0, p.stderr
    modes = {f.name: stat.S_IMODE(f.stat().st_mode) for f in (tmp_path / "hf").iterdir()}
    assert modes["model.safetensors"] == 0o644 and set(modes.values()) == {0o644}, modes


@pytest.mark.parametrize("hidden, extra", [("transformers", "export"), ("google", "export")])
def test_a_missing_extra_is_named_in_one_line(tmp_path, hidden, extra):
    """Regression: export without transformers said "error: unexpected ModuleNotFoundError",
    and without protobuf "No module named 'google'"; each names the extra to install."""
    code = (f"import sys; sys.modules[{hidden!r}] = None; from minlm.cli import main; "
            "sys.exit(main(sys.argv[1:]))")
    p = _cli("export", "llama-1m", "--format", "hf", "--out", str(tmp_path / "hf"), code=code)
    assert p.returncode == 2, p.stderr
    line = p.stderr.strip()
    assert "\n" not in line and "unexpected" not in line, line
    assert f'pip install "minlm[{extra}]"' in line and f'pip install -e ".[{extra}]"' in line


def test_notebook_1_trains_a_tokenizer_unlike_the_shipped_ones(tmp_path, shared_data):
    """Regression: notebook 1 trained a tokenizer byte-identical to the shipped 1024 one, so
    its comparison row said nothing. Its cells run here as the notebook runs them (not in
    smoke mode)."""
    from minlm.tokenizer import load_tokenizer, shipped_tokenizers

    nb = json.loads((REPO / "notebooks/1_build_tokenizer.ipynb").read_text())
    code = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    env = {k: v for k, v in os.environ.items() if k != "MINLM_SMOKE"}
    script = "\n".join(line for line in code[0].splitlines() if not line.startswith("%"))
    script += "\n" + code[1] + "\nprint(tok.hash)\nprint(tok.vocab_size)\n"
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       cwd=REPO / "notebooks", env={**env, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert p.returncode == 0, p.stderr
    digest, vocab = p.stdout.split()[-2:]
    shipped = {load_tokenizer(str(path)): name for name, path in shipped_tokenizers().items()}
    by_hash = {t.hash: name for t, name in shipped.items()}
    assert digest not in by_hash, f"the notebook's tokenizer is the shipped {by_hash.get(digest)}"
    assert int(vocab) in {t.vocab_size for t in shipped}  # a row the table can set beside one
