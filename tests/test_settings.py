"""Settings people bring: the seed projects' names as aliases, ``--config`` files (JSON or
YAML) with key=value overrides on top, and ``--dry-run`` printing what would be trained."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minlm.config import ConfigError
from minlm.settings import ALIASES, canonical, read_config_file

SEED_NAMES = {  # written out again here, so a wrong entry in ALIASES fails
    "learning_rate": ("train", "lr", "0.0123", 0.0123),
    "max_iter": ("train", "max_iters", "77", 77),
    "num_batch_accum": ("train", "grad_accum_steps", "3", 3),
    "n_layer": ("model", "n_layers", "3", 3),
    "n_head": ("model", "n_heads", "2", 2),
    "head_size": ("model", "head_dim", "24", 24),
    "val_iter": ("train", "eval_iters", "5", 5),
    "val_intervals": ("train", "eval_interval", "9", 9),
    "resume_checkpoint": ("train", "resume", "true", True),
    "compile_model": ("train", "compile", "true", True),
    "checkpoint_path": ("train", "out_dir", "elsewhere", "elsewhere"),
    "dataloader_num_workers": ("train", "num_workers", "2", 2),
    "verbose": ("train", "verbose", "false", False),
}


def test_every_seed_name_is_an_alias():
    assert set(ALIASES) == set(SEED_NAMES)
    notes = []
    for seed, (_, ours, _, _) in SEED_NAMES.items():
        assert canonical(seed, notes.append) == ours
    assert "note: 'learning_rate' is read as 'lr'" in notes and len(notes) == len(SEED_NAMES) - 1


def test_config_file_with_aliases_and_overrides_round_trips(tmp_path):
    """A seed-style JSON config, overrides on top, through the real command line."""
    config = tmp_path / "seed.json"
    config.write_text(json.dumps({k: json.loads(v[2]) if v[2][0].isdigit() or v[2] in
                                  ("true", "false") else v[2] for k, v in SEED_NAMES.items()}))
    cmd = [sys.executable, "-m", "minlm", "train", "--preset", "llama-1m", "--config",
           str(config), "--dry-run", "learning_rate=0.5", "dim=48"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    resolved = json.loads(done.stdout)
    for seed, (section, ours, _, value) in SEED_NAMES.items():
        expected = 0.5 if seed == "learning_rate" else value  # the override wins
        assert resolved[section][ours] == expected, seed
    assert resolved["model"]["dim"] == 48
    assert "note: 'learning_rate' is read as 'lr'" in done.stderr
    # the printed settings are a complete config: fed back, they resolve to themselves
    again = tmp_path / "resolved.json"
    again.write_text(done.stdout)
    items = read_config_file(again)
    assert "lr=0.5" in items and "dim=48" in items


def test_yaml_sections_and_bad_files(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  n_layer: 2\ntrain:\n  lr: 0.001\n  resume: false\n")
    assert read_config_file(path) == ["n_layer=2", "lr=0.001", "resume=false"]
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="list.json: must hold a mapping of settings, not list"):
        read_config_file(tmp_path / "list.json")
    (tmp_path / "torn.json").write_text('{"lr": ')
    with pytest.raises(ConfigError, match="torn.json: not valid JSON"):
        read_config_file(tmp_path / "torn.json")
    with pytest.raises(ConfigError, match="missing.json: cannot read it"):
        read_config_file(tmp_path / "missing.json")
