"""A run folder is data: the experiment it records is imported only by name from the local
experiment folders, or when the user opts in (``trust_experiment=True`` /
``--trust-experiment``). Each command that reads runs is run the way a person runs it, on a
shared run folder whose ``model_config.json`` names a payload that leaves a marker file when
imported: the marker must not appear, and must appear with the opt-in."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from minlm.config import ConfigError, TrainConfig

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def _payload(path: Path, marker: Path) -> None:
    path.write_text(f"from pathlib import Path\nPath({str(marker)!r}).write_text('ran')\n")


def _shared_run(tmp_path: Path, where: str) -> tuple[Path, Path]:
    """A copy of a shipped run whose config records a payload: ``inside`` the folder, an
    absolute path ``outside`` it, or a plain ``name`` that only a folder in the current
    directory (``tmp_path``) would satisfy. Returns (run folder, marker file)."""
    run = tmp_path / "runs" / "shared"
    shutil.copytree(REPO / "trained_models" / "llama-0.5m", run)
    marker = tmp_path / f"marker-{where}"
    if where == "inside":
        target = run / f"payload_{tmp_path.name}.py"
        recorded = str(target)
    elif where == "outside":
        target = tmp_path / "elsewhere" / f"payload_{tmp_path.name}.py"
        target.parent.mkdir()
        recorded = str(target)
    else:  # a name; the package sits in the directory the command runs in
        recorded = f"payload_{tmp_path.name.replace('-', '_')}"
        target = tmp_path / recorded / "__init__.py"
        target.parent.mkdir()
    _payload(target, marker)
    cfg_path = run / "model_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["experiment"] = recorded
    cfg_path.write_text(json.dumps(cfg))
    return run, marker


def _minlm(args: list[str], cwd: Path, stdin: str = "") -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINLM_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "minlm", *args], cwd=cwd, env=env,
                          input=stdin, capture_output=True, text=True, timeout=300)


def _commands(run: Path, tmp_path: Path) -> dict[str, tuple[list[str], str]]:
    text = tmp_path / "held.txt"
    text.write_text("Once upon a time there was a cat.\n\nThe dog ran home.\n")
    chat = tmp_path / "chat.jsonl"
    chat.write_text(json.dumps({"messages": [{"role": "user", "content": "hi"},
                                             {"role": "assistant", "content": "hello"}]}) + "\n")
    r = str(run)
    return {
        "generate": (["generate", r, "Once", "--max-new-tokens", "2"], ""),
        "chat": (["chat", r, "--max-new-tokens", "2"], "hi\n/quit\n"),
        "eval": (["eval", r, "--data", str(text)], ""),
        "compare --prompt": (["compare", r, "--out", str(tmp_path / "c.png"), "--prompt", "A",
                              "--max-new-tokens", "2"], ""),
        "export": (["export", r, "--format", "hf", "--out", str(tmp_path / "hf")], ""),
        "card": (["card", r, "--max-new-tokens", "2"], ""),
        "trace --run": (["trace", "--run", r], ""),
        "train init_from=": (["train", f"init_from={r}", "--dry-run"], ""),
        "train resume=true": (["train", "run_name=shared", f"out_dir={run.parent}",
                               "resume=true", "--dry-run"], ""),
        "sft": (["sft", r, "--data", str(chat), "max_steps=1", f"out_dir={tmp_path / 'o'}"], ""),
    }


COMMANDS = ["generate", "chat", "eval", "compare --prompt", "export", "card", "trace --run",
            "train init_from=", "train resume=true", "sft"]  # dpo loads as sft does


@pytest.mark.parametrize("command", COMMANDS)
def test_no_command_runs_the_code_a_run_folder_names(command, tmp_path):
    run, marker = _shared_run(tmp_path, "inside")
    args, stdin = _commands(run, tmp_path)[command]
    refused = _minlm(args, tmp_path, stdin)
    assert not marker.exists(), f"{command} imported the payload"
    assert refused.returncode == 2, refused.stderr
    line = refused.stderr.strip().splitlines()[-1]
    assert "experiment=" in line and "--trust-experiment" in line and str(run) in line
    _minlm(args + ["--trust-experiment"], tmp_path, stdin)  # may fail later: not the point
    assert marker.exists(), f"{command} --trust-experiment did not load the experiment"


@pytest.mark.parametrize("where", ["outside", "name"])
def test_a_path_elsewhere_or_a_name_not_found_locally_is_refused_too(where, tmp_path):
    run, marker = _shared_run(tmp_path, where)
    refused = _minlm(["generate", str(run), "Once", "--max-new-tokens", "2"], tmp_path)
    assert not marker.exists()
    assert refused.returncode == 2 and "--trust-experiment" in refused.stderr, refused.stderr
    _minlm(["generate", str(run), "Once", "--max-new-tokens", "2", "--trust-experiment"],
           tmp_path)
    assert marker.exists()


def test_listing_and_comparing_never_import_what_a_run_names(tmp_path):
    """compare without --prompt, even with the opt-in, reads only configs and logs."""
    run, marker = _shared_run(tmp_path, "outside")
    listed = _minlm(["compare", str(run), "--out", str(tmp_path / "c.png")], tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "shared" in listed.stdout
    _minlm(["compare", str(run), "--out", str(tmp_path / "c.png"), "--trust-experiment"],
           tmp_path)
    assert not marker.exists()


@pytest.mark.parametrize("where", ["inside", "outside", "name"])
def test_the_python_api_and_the_notebook_widgets_refuse_it(where, tmp_path, monkeypatch):
    from minlm.evaluate import compare, side_by_side
    from minlm.runs import list_runs, load_run
    from minlm.train import train
    from minlm.widgets import AttentionExplorer, run_picker

    monkeypatch.chdir(tmp_path)  # where a plain name would be found by a careless loader
    run, marker = _shared_run(tmp_path, where)
    table = list_runs(run.parent)
    picker = run_picker(table)
    assert list(picker.options) == ["shared"]
    recorded = json.loads((run / "model_config.json").read_text())
    assert table["vocab_size"][0] == recorded["vocab_size"] and table["params"][0] > 0
    assert compare([run])[0]["params"][0] == table["params"][0]
    hint = r"records experiment=.*trust_experiment=True \(command line: --trust-experiment\)"
    with pytest.raises(ConfigError, match=hint):
        load_run(run)
    with pytest.raises(ConfigError, match=hint):
        side_by_side([run], ["A"], 2)
    with pytest.raises(ConfigError, match=hint):
        AttentionExplorer([str(run)])
    from minlm.config import ModelConfig

    with pytest.raises(ConfigError, match=hint):
        train(ModelConfig.from_preset("llama-0.5m"),
              TrainConfig(init_from=str(run), out_dir=str(tmp_path / "o"), max_iters=1))
    assert not marker.exists()
    assert load_run(run, trust_experiment=True).name == "shared"
    assert marker.exists()


def test_a_packed_ternary_file_is_checked_the_same_way(tmp_path):
    """The packed ternary format carries its model config in the file's metadata."""
    from safetensors.torch import save_file

    from minlm.ternary import FORMAT, load_packed_model

    marker = tmp_path / "marker"
    payload = tmp_path / "payload_packed.py"
    _payload(payload, marker)
    cfg = json.loads((REPO / "trained_models" / "llama-0.5m" / "model_config.json").read_text())
    cfg["experiment"] = str(payload)
    import torch

    path = tmp_path / "packed.safetensors"
    save_file({"x": torch.zeros(1)}, str(path),
              metadata={"format": FORMAT, "model_config": json.dumps(cfg)})
    with pytest.raises(ConfigError, match="--trust-experiment"):
        load_packed_model(path)
    assert not marker.exists()


def test_a_local_experiment_by_name_still_loads_from_a_run(tmp_path):
    """experiments/diffattn recorded by name is local code: it loads without the opt-in."""
    from minlm.runs import read_configs

    run = tmp_path / "diff"
    shutil.copytree(REPO / "trained_models" / "llama-0.5m", run)
    cfg = json.loads((run / "model_config.json").read_text())
    cfg.update(experiment="diffattn", mixer="diffattn")
    (run / "model_config.json").write_text(json.dumps(cfg))
    assert read_configs(run)[0].mixer == "diffattn"


def test_experiment_folders_from_the_environment_are_local_too(tmp_path, monkeypatch):
    from minlm.modules import registry

    marker = tmp_path / "marker"
    pkg = tmp_path / "mine" / "myexp_env_folder"
    pkg.mkdir(parents=True)
    _payload(pkg / "__init__.py", marker)
    with pytest.raises(ConfigError, match="--trust-experiment"):
        registry.check_recorded_experiment("myexp_env_folder", "a run")
    monkeypatch.setenv("MINLM_EXPERIMENTS_PATH", str(tmp_path / "mine"))
    registry.check_recorded_experiment("myexp_env_folder", "a run")
    registry.load_experiment("myexp_env_folder")
    assert marker.exists()
