"""Settings as people bring them: config files and the names the seed projects used.

``--config file.json`` (or ``.yaml``) on a training command becomes ``key=value`` items that
go through exactly the parsing and validation of command-line overrides, with the command
line's own overrides applied on top. A file may be flat or split into ``model`` / ``train``
(or ``finetune``) sections. The seed projects' names (``learning_rate``, ``n_layer``, ...) are
accepted as aliases of ours, each with a one-line notice, so their configs keep working.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from minlm.config import ConfigError, ModelConfig, TrainConfig
from minlm.modules import registry

# the seed scripts' name -> minlm's field (ModelConfig or TrainConfig)
ALIASES = {
    "learning_rate": "lr",
    "max_iter": "max_iters",
    "num_batch_accum": "grad_accum_steps",
    "n_layer": "n_layers",
    "n_head": "n_heads",
    "head_size": "head_dim",
    "val_iter": "eval_iters",
    "val_intervals": "eval_interval",
    "resume_checkpoint": "resume",
    "compile_model": "compile",
    "checkpoint_path": "out_dir",
    "dataloader_num_workers": "num_workers",
    "verbose": "verbose",  # same name here; listed so that the seed's full set is accepted
}
SECTIONS = ("model", "train", "finetune", "sft", "dpo")


def canonical(key: str, notice=None) -> str:
    """Our name for ``key`` (dashes read as underscores); an alias says what it maps to."""
    key = key.strip().replace("-", "_")
    ours = ALIASES.get(key, key)
    if ours != key:
        (notice or (lambda m: print(m, file=sys.stderr)))(f"note: {key!r} is read as {ours!r}")
    return ours


def canonical_item(item: str, notice=None) -> str:
    """A ``key=value`` item with the key in our spelling (other items are left as they are)."""
    if "=" not in item:
        return item
    key, value = item.split("=", 1)
    return f"{canonical(key, notice)}={value}"


def _as_text(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return "" if value is None else str(value)


def read_config_file(path: str | Path) -> list[str]:
    """The settings in a JSON or YAML file as ``key=value`` items (sections flattened)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read it ({e.strerror or e})") from None
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml  # only YAML configs need it (pyyaml, in requirements.txt)

        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            raise ConfigError(f"--config {path}: not valid YAML ({e})") from None
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"--config {path}: not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: must hold a mapping of settings, not "
                          f"{type(data).__name__}")
    flat: dict = {}
    for key, value in data.items():
        if key in SECTIONS and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return [f"{k}={_as_text(v)}" for k, v in flat.items()]


def take_preset(items: list[str], preset: str | None) -> tuple[str | None, list[str]]:
    """``preset=NAME`` among key=value settings names the model preset, as ``--preset`` does.

    Why: ``preset`` is also TrainConfig's record of the preset, so without this a run given
    ``preset=mamba-1m`` silently built the default model and recorded ``llama-1m``.
    """
    named = [i.partition("=")[2] for i in items if i.partition("=")[0] == "preset"]
    rest = [i for i in items if i.partition("=")[0] != "preset"]
    if named and preset and named[-1] != preset:
        raise ConfigError(f"--preset {preset} and preset={named[-1]} disagree: give one of them")
    return (named[-1] if named else preset), rest


def preset_config(preset: str, model_items: list[str]) -> ModelConfig:
    """The preset with key=value model settings on top; an ``experiment=`` among them is
    loaded first, because the presets it adds (``diffattn-1m``) exist only then."""
    for item in model_items:
        key, _, value = item.partition("=")
        if key == "experiment" and value:
            registry.load_experiment(value)
    return ModelConfig.from_preset(preset).with_overrides(model_items)


def item_key(item: str) -> str:
    """The setting a ``key=value`` item names, as the configs spell it."""
    return item.split("=", 1)[0].strip().replace("-", "_")


def route_items(items: list[str]) -> tuple[list[str], list[str]]:
    """(ModelConfig items, TrainConfig items) of ``key=value`` items; an unknown key is an
    error that lists both configs' fields."""
    model_keys, train_keys = set(ModelConfig.field_names()), set(TrainConfig.field_names())
    model_items, train_items = [], []
    for item in items:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key=value")
        key = item_key(item)
        if key in model_keys:
            model_items.append(item)
        elif key in train_keys:
            train_items.append(item)
        else:
            raise ConfigError(
                f"unknown setting {key!r}; model settings: {', '.join(ModelConfig.field_names())}; "
                f"training settings: {', '.join(TrainConfig.field_names())}")
    return model_items, train_items
