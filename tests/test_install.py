"""The install as a newcomer does it, in a fresh venv: ``pip install .`` alone, where every
command either runs or names the extra it needs in one line; then the README's install
(``pip install -r requirements.txt``), after which notebook 5 runs top to bottom.

pyproject.toml is the one list of dependencies; requirements*.txt only name its extras. The
venv test takes minutes (it installs torch from the local CPU wheel, then the core and the
extras) and is marked ``install``; CI runs it with the rest of the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from minlm.errors import EXTRAS

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
README_EXTRAS = ["notebooks", "search", "export", "data"]


def _names(requirements: list[str]) -> set[str]:
    import re

    return {re.split(r"[<>=!~\[ ;]", r, maxsplit=1)[0].lower() for r in requirements}


def _requirement_lines(path: Path) -> list[str]:
    return [line.split("#")[0].strip() for line in path.read_text().splitlines()
            if line.split("#")[0].strip()]


def test_requirements_files_name_the_pyproject_extras():
    """One list: requirements.txt is the README's extras of pyproject, requirements-dev.txt
    the dev extra, which holds every other extra."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert _requirement_lines(REPO / "requirements.txt") == [f"-e .[{','.join(README_EXTRAS)}]"]
    assert _requirement_lines(REPO / "requirements-dev.txt") == ["-e .[dev]"]
    included = [r for r in extras["dev"] if r.startswith("minlm[")]
    assert len(included) == 1 and set(included[0][6:-1].split(",")) == set(extras) - {"dev"}


def test_every_missing_module_names_an_extra_that_installs_it():
    extras = PYPROJECT["project"]["optional-dependencies"]
    for module, (package, extra) in EXTRAS.items():
        assert package.lower() in _names(extras[extra]), (module, package, extra)


# --- a fresh venv ---------------------------------------------------------------------------

def _source_copy(dest: Path) -> Path:
    """What a clone holds that ``pip install .`` reads, copied so the build writes nothing
    into this checkout."""
    dest.mkdir(parents=True)
    for name in ("pyproject.toml", "README.md", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(REPO / name, dest / name)
    for folder in ("minlm", "tokenizers"):
        shutil.copytree(REPO / folder, dest / folder,
                        ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    return dest


@pytest.fixture(scope="module")
def venv(tmp_path_factory):
    root = tmp_path_factory.mktemp("install")
    src = _source_copy(root / "src")
    env_dir = root / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(env_dir)], check=True, timeout=300)
    py = env_dir / "bin" / "python"
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "VIRTUAL_ENV") and not k.startswith("JUPYTER")}
    env.update(PATH=f"{env_dir / 'bin'}{os.pathsep}{env.get('PATH', '')}", OMP_NUM_THREADS="1",
               JUPYTER_DATA_DIR=str(root / "jupyter-data"), JUPYTER_PATH="",
               JUPYTER_CONFIG_DIR=str(root / "jupyter-config"), PIP_DISABLE_PIP_VERSION_CHECK="1")

    def pip(*args: str) -> None:
        p = subprocess.run([str(py), "-m", "pip", "install", "-q", *args], cwd=src, env=env,
                           capture_output=True, text=True, timeout=1200)
        assert p.returncode == 0, f"pip install {' '.join(args)}:\n{p.stdout}\n{p.stderr}"

    pip("torch==2.13.0")  # the local CPU wheel; a bare "torch" would pull the CUDA build
    pip("setuptools>=68")
    pip("--no-build-isolation", ".")  # the core alone, as a wheel (not editable)
    return {"root": root, "src": src, "python": py, "env": env, "pip": pip}


def _run(venv, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """``python -m minlm ...`` of the venv, in a folder with no minlm source beside it."""
    work = venv["root"] / "work"
    work.mkdir(exist_ok=True)
    return subprocess.run([str(venv["python"]), "-m", "minlm", *args], cwd=work, env=venv["env"],
                          input=stdin, capture_output=True, text=True, timeout=600)


def _one_line_naming(p: subprocess.CompletedProcess, extra: str) -> None:
    """Exit 2 and one ``error:`` line naming the extra (a progress bar may come before it)."""
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    errors = [line[line.index("error:"):] for line in p.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1 and "Traceback" not in p.stderr, p.stderr[-2000:]
    assert "unexpected" not in errors[0] and f'pip install "minlm[{extra}]"' in errors[0], errors


@pytest.mark.install
def test_core_install_runs_every_command_or_names_its_extra(venv, shared_data, tmp_path):
    runs = REPO / "trained_models"
    chat = shared_data / "chat"
    t = str(tmp_path)
    tiny = ["dim=32", "n_layers=1", "n_heads=2", "n_kv_heads=1", "block_size=32",
            "batch_size=2", "eval_iters=1", "max_docs=200"]
    ok = {
        "trace": ["trace", "--preset", "llama-1m", "--depth", "1"],
        "train": ["train", "--recipe", "speedrun", "max_iters=3", *tiny, "run_name=t",
                  f"out_dir={t}"],
        "generate": ["generate", str(runs / "llama-1m"), "Once upon a time",
                     "--max-new-tokens", "5"],
        "eval": ["eval", f"{t}/t", "--data", str(shared_data / "tinystories/valid.txt"),
                 "--max-docs", "3"],
        "card": ["card", f"{t}/t"],
        "compare": ["compare", str(runs / "llama-1m"), str(runs / "gpt2-1m"), "--out",
                    f"{t}/c.png"],
        "prepare": ["prepare", str(shared_data / "tinystories/valid.txt"), "--tokenizer",
                    "tinystories-512", "--out", f"{t}/shards", "--max-tokens", "20000"],
        "tokenizer": ["tokenizer", "measure", str(shared_data / "tinystories/valid.txt"),
                      "tinystories-512"],
        "convert": ["convert", str(chat / "hh_rlhf_helpful_sft.jsonl"), f"{t}/chat.parquet"],
        "sft": ["sft", f"{t}/t", "--data", str(chat / "hh_rlhf_helpful_sft.jsonl"),
                "max_steps=2", "batch_size=2", "max_examples=16", "run_name=s", f"out_dir={t}"],
        "dpo": ["dpo", f"{t}/s", "--data", str(chat / "hh_rlhf_helpful_dpo.jsonl"),
                "max_steps=2", "batch_size=2", "max_examples=16", "run_name=d", f"out_dir={t}"],
    }
    for name, args in ok.items():
        p = _run(venv, *args)
        assert p.returncode == 0, (name, p.stderr[-3000:])
    p = _run(venv, "chat", str(runs / "llama-1m-chat"), "--max-new-tokens", "4",
             stdin="Hello\n/quit\n")
    assert p.returncode == 0 and "assistant>" not in p.stderr, p.stderr[-2000:]
    needs = {
        "search": (["search", "--preset", "llama-1m", "dim=32,64", "max_iters=2", f"out_dir={t}"],
                   "search"),
        "export": (["export", str(runs / "llama-1m"), "--format", "hf", "--out", f"{t}/hf"],
                   "export"),
        "export gguf": (["export", str(runs / "llama-1m"), "--format", "gguf", "--out",
                         f"{t}/m.gguf"], "export"),
        "import": (["import", f"{t}/hf-missing", "--name", "x"], "export"),
        "prepare hf:": (["prepare", "hf:roneneldan/TinyStories", "--tokenizer", "tinystories-512",
                         "--out", f"{t}/hub"], "data"),
    }
    for name, (args, extra) in needs.items():
        p = _run(venv, *args)
        _one_line_naming(p, extra)
    p = _run(venv, "train", f"out_dir={t}", "logger=tensorboard", "max_iters=1", *tiny)
    _one_line_naming(p, "loggers")


@pytest.mark.install
def test_the_readme_install_runs_notebook_5_top_to_bottom(venv, tmp_path):
    """The README's install command alone (requirements.txt), then notebook 5 executed in
    that venv's kernel: its last cell traces transformers' Llama (issue 32: it failed with
    No module named 'transformers')."""
    venv["pip"]("-r", "requirements.txt")
    nb = tmp_path / "5_trace_modules.ipynb"
    shutil.copy(REPO / "notebooks" / nb.name, nb)
    # a cell that says which interpreter ran the notebook: the venv's, not this one's
    book = json.loads(nb.read_text())
    book["cells"].append({"cell_type": "code", "metadata": {}, "execution_count": None,
                          "outputs": [], "source": ["import sys; print(sys.prefix)"]})
    nb.write_text(json.dumps(book))
    script = (
        "import sys, nbformat\n"
        "from nbclient import NotebookClient\n"
        "nb = nbformat.read(sys.argv[1], as_version=4)\n"
        "NotebookClient(nb, timeout=600, kernel_name='python3',\n"
        "               resources={'metadata': {'path': sys.argv[2]}}).execute()\n"
        "print(nb.cells[-1].outputs[0]['text'].strip())\n")
    p = subprocess.run([str(venv["python"]), "-c", script, str(nb), str(REPO / "notebooks")],
                       cwd=tmp_path, env=venv["env"], capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-4000:]
    assert p.stdout.strip().splitlines()[-1] == str(venv["root"] / "venv"), p.stdout
    p = _run(venv, "export", str(REPO / "trained_models" / "llama-1m"), "--format", "hf",
             "--out", str(tmp_path / "hf"))
    assert p.returncode == 0, p.stderr[-3000:]
    p = _run(venv, "export", str(REPO / "trained_models" / "llama-1m"), "--format", "gguf",
             "--out", str(tmp_path / "m.gguf"))
    assert p.returncode == 0, p.stderr[-3000:]
