"""Model and training configuration: the one source of truth for every default.

Both configs are plain dataclasses that serialise to JSON and back exactly, so a run folder
can rebuild its model with ``ModelConfig(**json.load(f))``. Choices are ``Literal`` strings
resolved through small registries in ``minlm.modules``; token and channel mixers (``mixer``,
``mlp``, layout steps), norms and positional schemes are checked against
``minlm.modules.registry`` after ``experiment=`` loads, so no second list of their names
lives here; derived values are filled in
``__post_init__``; a bad value raises ``ValueError`` naming the field, the value and what is
allowed. Nothing warns and falls back.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Literal

from minlm.errors import ConfigError  # re-exported: minlm.config.ConfigError
from minlm.modules import registry
from minlm.modules.block import layout_mixers, uses_moe_step

Activation = Literal["gelu", "relu", "silu", "relu2", "swiglu", "geglu", "kan"]
Init = Literal["normal", "xavier", "tfixup"]
Linear = Literal["linear", "bitlinear"]
Schedule = Literal["cosine", "linear", "constant", "wsd"]
Optimizer = Literal["adamw", "muon"]
Precision = Literal["fp32", "bf16", "auto"]
Device = Literal["auto", "cpu", "cuda", "mps"]


def _fail(name: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"{name}={value!r} is invalid: {allowed}")


def _literal_choices(tp: Any) -> tuple | None:
    if typing.get_origin(tp) is Literal:
        return typing.get_args(tp)
    return None


class _Serialisable:
    """JSON round-trip, string overrides and validation shared by both configs."""

    def _require(self, names: tuple[str, ...], ok, rule: str) -> None:
        """Reject the first field among ``names`` whose value fails ``ok``, saying ``rule``."""
        for name in names:
            if not ok(getattr(self, name)):
                _fail(name, getattr(self, name), rule)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False)
        if path is not None:
            from minlm.fileio import atomic_write_text

            atomic_write_text(Path(path), text + "\n")
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        cls._reject_unknown(data)
        return cls(**data)

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike):
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            path = Path(path_or_text)
            try:
                text = path.read_text()
            except FileNotFoundError:
                raise ConfigError(f"config file {str(path)!r} does not exist") from None
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"config JSON is not valid: {e}") from None
        return cls.from_dict(data)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls) if f.init]

    @classmethod
    def _reject_unknown(cls, data: dict[str, Any]) -> None:
        valid = cls.field_names()
        unknown = [k for k in data if k not in valid]
        if unknown:
            raise ConfigError(
                f"unknown {cls.__name__} field(s) {', '.join(unknown)}; "
                f"valid fields are: {', '.join(valid)}"
            )

    def replace(self, **overrides):
        type(self)._reject_unknown(overrides)
        return dataclasses.replace(self, **overrides)

    def with_overrides(self, overrides: list[str] | dict[str, Any]):
        """Apply ``key=value`` strings (CLI style) or a dict, coercing types from the fields."""
        if isinstance(overrides, dict):
            return self.replace(**overrides)
        return self.replace(**type(self).parse_overrides(overrides))

    @classmethod
    def parse_overrides(cls, items: list[str]) -> dict[str, Any]:
        hints = typing.get_type_hints(cls)
        out: dict[str, Any] = {}
        for item in items:
            if "=" not in item:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            key, raw = item.split("=", 1)
            key = key.strip().replace("-", "_")
            cls._reject_unknown({key: None})
            out[key] = coerce(key, raw.strip(), hints[key])
        return out

    def _check_types(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in fields(self):
            value = getattr(self, f.name)
            _check_type(f.name, value, hints[f.name])


def _check_type(name: str, value: Any, tp: Any) -> None:
    choices = _literal_choices(tp)
    if choices is not None:
        if value not in choices:
            _fail(name, value, "must be one of " + ", ".join(repr(c) for c in choices))
        return
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return
        for a in args:
            if a is type(None):
                continue
            try:
                _check_type(name, value, a)
                return
            except ConfigError:
                continue
        _fail(name, value, f"must be of type {tp}")
    if tp is bool:
        if not isinstance(value, bool):
            _fail(name, value, "must be true or false")
    elif tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            _fail(name, value, "must be an integer")
    elif tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _fail(name, value, "must be a number")
        if not math.isfinite(value):  # nan slips through every ``<``/``>`` range check below
            _fail(name, value, "must be a finite number")
    elif tp is str:
        if not isinstance(value, str):
            _fail(name, value, "must be a string")
    elif origin is dict:
        if not isinstance(value, dict):
            _fail(name, value, "must be a mapping")


def coerce(name: str, raw: str, tp: Any) -> Any:
    """Turn a CLI string into the field's type; JSON syntax is accepted for dicts and lists."""
    choices = _literal_choices(tp)
    if choices is not None:
        if raw not in choices:
            _fail(name, raw, "must be one of " + ", ".join(repr(c) for c in choices))
        return raw
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if raw.lower() in ("none", "null", "") and type(None) in typing.get_args(tp):
            return None
        errors = []
        for a in args:
            try:
                return coerce(name, raw, a)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0])
    if tp is bool:
        low = raw.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        _fail(name, raw, "must be true or false")
    if tp is int:
        try:
            return int(raw.replace("_", ""))
        except ValueError:
            try:
                f = float(raw)
            except ValueError:
                f = math.nan
            if f.is_integer():
                return int(f)
            _fail(name, raw, "must be an integer")
    if tp is float:
        try:
            return float(raw)
        except ValueError:
            _fail(name, raw, "must be a number")
    if origin is dict:
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            _fail(name, raw, 'must be a JSON object such as {"4": 0}')
        if not isinstance(value, dict):
            _fail(name, raw, 'must be a JSON object such as {"4": 0}')
        return value
    return raw


@dataclass
class ModelConfig(_Serialisable):
    """Everything that decides the architecture and the parameter count."""

    vocab_size: int = 2048
    block_size: int = 256  # context length in tokens
    dim: int = 128
    n_layers: int = 4
    n_heads: int = 4
    n_kv_heads: int = 0  # 0 means n_heads (plain multi-head attention)
    head_dim: int = 0  # 0 means dim // n_heads
    # token mixer and its options: a name registered in minlm.modules.registry
    mixer: str = "attention"
    mixer_options: dict[str, Any] = field(default_factory=dict)  # e.g. {"d_state": 16} (mamba)
    # a package in experiments/ (or a path to one) that registers more mixers and presets;
    # loaded before the names are checked, and recorded so the run reloads later
    experiment: str = ""
    position: str = "rope"  # a scheme registered in minlm.modules.registry (rope, alibi, ...)
    rope_theta: float = 10000.0
    window: int = 0  # sliding-window attention span; 0 means full causal attention
    qk_norm: bool = False
    attn_softcap: float = 0.0  # tanh soft-capping of attention scores; 0 disables
    attn_bias: bool = False  # biases of the mixer's projections (attention or MLGRU)
    # value embeddings (modded-nanogpt): this many extra token tables; table k is mixed into
    # the attention values of layer k and of the k-th of the last value_embeds layers
    value_embeds: int = 0
    # every linear layer inside the blocks: "bitlinear" = ternary weights, 8-bit activations
    # (BitNet b1.58); embeddings, head and MoE router stay full precision
    linear: Linear = "linear"
    # channel mixer: "" picks "moe" when n_experts > 0, "kan" for activation="kan", else "mlp"
    mlp: str = ""
    activation: Activation = "swiglu"  # "kan": the MLP's linear layers become B-spline KAN layers
    hidden_dim: int = 0  # 0 means derived from hidden_mult and multiple_of
    hidden_mult: float = 4.0
    multiple_of: int = 32
    mlp_bias: bool = False
    kan_grid: int = 5  # activation="kan": spline intervals on [-2, 2]
    kan_order: int = 3  # activation="kan": B-spline order (3 = cubic)
    n_experts: int = 0  # mixture of experts: 0 means one plain MLP per block
    experts_top_k: int = 2  # experts each token is sent to (n_experts > 0)
    aux_loss_weight: float = 0.01  # weight of the load-balancing loss added to the training loss
    # norms and residual stream
    norm: str = "rmsnorm"  # a norm registered in minlm.modules.registry
    norm_eps: float = 1e-5
    norm_affine: bool = True
    norm_bias: bool = False  # LayerNorm bias
    # one layout for every layer, or a list used layer by layer (cycling); see modules/block.py
    block_spec: str | list[str] = "norm>attn>+ norm>mlp>+"
    tied_blocks: dict[str, int] = field(default_factory=dict)  # {"4": 0}: block 4 reuses block 0
    # multiplies the token embeddings as they enter the residual stream (the first residual);
    # Gemma and Grok use sqrt(dim); the tied head is not scaled
    embed_scale: float = 1.0
    # U-net skips: block i's output is added, with a learned weight, to the input of block
    # n_layers - 1 - i, for the first n_layers // 2 blocks
    unet_skips: bool = False
    # output
    tie_embeddings: bool = True
    logit_softcap: float = 0.0  # tanh soft-capping of the output logits; 0 disables
    # initialisation and regularisation
    init: Init = "normal"
    init_std: float = 0.0  # 0 means min(0.02, 0.3 / sqrt(dim)), so init loss stays near ln(vocab)
    dropout: float = 0.0
    # zero every projection that writes to the residual stream (mixer and MLP outputs) and,
    # untied, the head: each block starts as the identity and the initial loss is ln(vocab)
    zero_init_proj: bool = False

    def __post_init__(self) -> None:
        if isinstance(self.tied_blocks, dict) and not all(
                isinstance(v, int) and not isinstance(v, bool) for v in self.tied_blocks.values()):
            _fail("tied_blocks", self.tied_blocks, 'values must be block indices, e.g. {"4": 0}')
        self.tied_blocks = {str(k): int(v) for k, v in dict(self.tied_blocks).items()}
        if isinstance(self.block_spec, str) and self.block_spec.lstrip().startswith("["):
            try:  # a list given on the command line as JSON
                self.block_spec = json.loads(self.block_spec)
            except json.JSONDecodeError as e:
                _fail("block_spec", self.block_spec, f"is not a JSON list of layouts ({e})")
        if isinstance(self.block_spec, (list, tuple)):
            self.block_spec = list(self.block_spec)
            if not all(isinstance(s, str) for s in self.block_spec):
                _fail("block_spec", self.block_spec, "must be a layout string or a list of them")
        self._check_types()  # also rejects NaN / infinity in float fields
        for name in ("vocab_size", "block_size", "dim", "n_layers", "n_heads"):
            if getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be a positive integer")
        for name in ("n_kv_heads", "head_dim", "hidden_dim", "window"):
            if getattr(self, name) < 0:
                _fail(name, getattr(self, name), "must be 0 (automatic) or a positive integer")
        if self.head_dim == 0 and self.dim % self.n_heads != 0:
            raise ConfigError(
                f"dim={self.dim} is not divisible by n_heads={self.n_heads}; choose n_heads "
                f"among {_divisors(self.dim)} or set head_dim explicitly"
            )
        if self.n_kv_heads and self.n_heads % self.n_kv_heads != 0:
            raise ConfigError(
                f"n_heads={self.n_heads} is not divisible by n_kv_heads={self.n_kv_heads}; "
                f"n_kv_heads must be one of {_divisors(self.n_heads)}"
            )
        if not 0.0 <= self.dropout < 1.0:
            _fail("dropout", self.dropout, "must be in [0, 1)")
        if self.norm_eps <= 0:
            _fail("norm_eps", self.norm_eps, "must be > 0")
        if self.init_std < 0:
            _fail("init_std", self.init_std, "must be > 0, or 0 for the automatic value")
        if self.rope_theta <= 0:
            _fail("rope_theta", self.rope_theta, "must be > 0")
        if self.hidden_mult <= 0:
            _fail("hidden_mult", self.hidden_mult, "must be > 0")
        if self.multiple_of < 1:
            _fail("multiple_of", self.multiple_of, "must be a positive integer")
        if self.attn_softcap < 0 or self.logit_softcap < 0:
            name = "attn_softcap" if self.attn_softcap < 0 else "logit_softcap"
            _fail(name, getattr(self, name), "must be >= 0 (0 disables soft-capping)")
        if self.embed_scale <= 0:
            _fail("embed_scale", self.embed_scale, "must be > 0 (1.0 leaves embeddings unscaled)")
        if self.aux_loss_weight < 0:
            _fail("aux_loss_weight", self.aux_loss_weight, "must be >= 0 (0 disables load balancing)")
        if self.kan_grid < 1:
            _fail("kan_grid", self.kan_grid, "must be a positive integer")
        if self.kan_order < 0:
            _fail("kan_order", self.kan_order, "must be >= 0 (0: piecewise constant, 3: cubic)")
        if self.n_experts < 0:
            _fail("n_experts", self.n_experts, "must be >= 0 (0: a plain MLP, no experts)")
        if self.n_experts and not 1 <= self.experts_top_k <= self.n_experts:
            _fail("experts_top_k", self.experts_top_k,
                  f"must be between 1 and n_experts={self.n_experts}")
        if self.experts_top_k < 1:
            _fail("experts_top_k", self.experts_top_k, "must be a positive integer")
        self._check_mixers()
        for k, v in self.tied_blocks.items():
            if not k.isdigit() or not 0 <= int(k) < self.n_layers or not 0 <= v < self.n_layers:
                _fail("tied_blocks", self.tied_blocks, f"keys and values must be block indices 0..{self.n_layers - 1}")
            if int(k) <= v:
                _fail("tied_blocks", self.tied_blocks, "each block may only reuse an earlier block (key > value)")

    def _check_mixers(self) -> None:
        """Names against the registries; each mixer in use validates its options; options of
        mixers no layer uses would silently do nothing, so they are refused."""
        if self.experiment:
            registry.load_experiment(self.experiment)
        registry.mixer_spec(self.mixer)
        norm = registry.norm_spec(self.norm)
        position = registry.position_spec(self.position)
        used = [registry.mixer_spec(n, "block_spec") for n in layout_mixers(self)]
        channels = [registry.channel_mixer_spec(self.channel_mixer)]
        if uses_moe_step(self):
            channels.append(registry.channel_mixer_spec("moe", "block_spec"))
        if any(c.name == "moe" for c in channels):  # its experts: the dense channel mixer
            dense = self.mlp if self.mlp and self.mlp != "moe" else \
                "kan" if self.activation == "kan" else "mlp"
            channels += [registry.channel_mixer_spec(dense)] * (dense != channels[0].name)
        registry.check_options(self.mixer_options, used + channels)  # types first
        for spec in used + channels + [norm, position]:
            if spec.validate is not None:
                spec.validate(self)
        if position.in_attention and not any(s.positional for s in used):
            _fail("position", self.position, "no layer uses attention or another mixer that "
                  f"reads positions ({self.position!r} acts inside attention, and the layers use "
                  f"{', '.join(s.name for s in used)}); use 'none' (a recurrence "
                  "knows the order) or 'learned'")
        defaults = {f.name: f.default for f in fields(self)}
        in_use = {n for s in used for n in s.config_fields}
        for spec in registry.mixers().values():
            for name in spec.config_fields:
                if name not in in_use and getattr(self, name) != defaults[name]:
                    _fail(name, getattr(self, name), f"only mixer {spec.name!r} reads it and no "
                          f"layer uses {spec.name!r}; leave it at {defaults[name]!r}")

    @property
    def channel_mixer(self) -> str:
        """The channel mixer's registered name (``mlp``, or derived when it is empty)."""
        if self.mlp:
            return self.mlp
        return "moe" if self.n_experts else "kan" if self.activation == "kan" else "mlp"

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def ffn_dim(self) -> int:
        """Hidden width of the MLP; gated MLPs take 2/3 so the parameter count stays comparable."""
        if self.hidden_dim:
            return self.hidden_dim
        hidden = self.hidden_mult * self.dim
        if self.activation in ("swiglu", "geglu"):
            hidden = 2 * hidden / 3
        m = self.multiple_of
        return int(m * math.ceil(int(hidden) / m))

    @property
    def std(self) -> float:
        return self.init_std or min(0.02, 0.3 / math.sqrt(self.dim))

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "ModelConfig":
        from minlm.presets import PRESETS

        if overrides.get("experiment"):  # its presets exist once it is loaded
            registry.load_experiment(overrides["experiment"])
        if name not in PRESETS:
            raise ConfigError(
                f"unknown preset {name!r}; available presets: {', '.join(PRESETS)} (an "
                "experiment adds its own: pass experiment=<name or path>)"
            )
        base = dict(PRESETS[name])
        cls._reject_unknown(overrides)
        base.update(overrides)
        return cls(**base)


@dataclass
class TrainConfig(_Serialisable):
    """Everything about how a model is trained; names match the scripts people know."""

    run_name: str = ""  # empty: derived from the preset and the time
    preset: str = ""  # the ModelConfig preset the run started from, for the record
    objective: str = "pretrain"  # a registered objective (minlm.objectives; experiments add)
    data: str = "tinystories"  # a dataset name, a text/JSONL/parquet file or a folder
    tokenizer: str = ""  # path to a tokenizer; empty: the shipped one matching vocab_size
    out_dir: str = "trained_models"
    max_iters: int = 2000
    max_minutes: float = 0.0  # wall-clock budget (evaluated 20 times over); 0: no limit
    batch_size: int = 32
    grad_accum_steps: int = 1
    # batch-size warm-up: the batch grows linearly from batch_warmup_start x batch_size to
    # batch_size over the first batch_warmup_iters steps (0: the full batch from the start)
    batch_warmup_iters: int = 0
    batch_warmup_start: float = 0.25
    lr: float = 3e-3
    min_lr_ratio: float = 0.1
    warmup_iters: int = 100
    schedule: Schedule = "cosine"
    # schedule="wsd" (warm-up, stable, decay): the last decay_frac of the run decays linearly
    decay_frac: float = 0.2
    optimizer: Optimizer = "adamw"
    # learning rate of the matrices outside the blocks (embeddings, an untied head) as a
    # multiple of lr: at 1M parameters with a 4096 vocabulary they are half the model
    embed_lr_mult: float = 1.0
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0  # 0 disables clipping
    eval_interval: int = 200
    eval_iters: int = 20
    eval_batch_size: int = 0  # 0 means batch_size
    log_interval: int = 10
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    seed: int = 1337
    # the seed group this run belongs to (``train seeds=N`` names it; its sibling runs
    # <group>-s0, -s1, ... share it and ``compare`` shows them as one curve with a band)
    group: str = ""
    device: Device = "auto"
    precision: Precision = "fp32"
    compile: bool = False
    fsdp: bool = False  # shard parameters with FSDP2 (under torchrun) instead of replicating
    resume: bool = False
    overwrite: bool = False
    allow_data_change: bool = False  # resume on data other than the run's (its hashes differ)
    num_workers: int = 0  # processes used to tokenize the corpus; 0 means all cores
    val_fraction: float = 0.0  # held-out share when the data has no separate validation file
    max_docs: int = 0  # use only the first N documents (0 = all); handy for quick experiments
    max_bad_steps: int = 5  # stop after this many non-finite steps in a row (each one is skipped)
    verbose: bool = True
    epochs: float = 0.0  # > 0: train this many passes over the training tokens (sets max_iters)
    init_from: str = ""  # a run (name or folder) whose weights this new run starts from
    keep_best: bool = False  # also keep the best evaluation's weights (model-best.safetensors)
    patience: int = 0  # stop after this many evaluations in a row above the best; 0: never
    logger: str = ""  # also log rows to "tensorboard", "mlflow", "wandb" (comma-separated)
    target_bpb: float = 0.0  # record the first evaluation at or below this val bits/byte; 0: off
    stop_at_bpb: float = 0.0  # end the run at the first evaluation at or below this; 0: never

    def __post_init__(self) -> None:
        self._check_types()  # also rejects NaN / infinity in float fields
        self._require(("max_iters", "batch_size", "grad_accum_steps", "eval_interval",
                       "log_interval", "checkpoint_interval", "keep_checkpoints", "max_bad_steps"),
                      lambda v: v >= 1, "must be a positive integer")
        self._require(("eval_iters", "warmup_iters", "eval_batch_size", "num_workers", "max_docs",
                       "epochs", "patience", "batch_warmup_iters"),
                      lambda v: v >= 0, "must be >= 0")
        logger_names(self.logger)
        if self.init_from and self.resume:
            raise ConfigError(f"init_from={self.init_from!r} starts a new run from another run's "
                              "weights and resume=true continues this one; pick one")
        self._require(("lr",), lambda v: v > 0, "must be > 0")
        self._require(("min_lr_ratio",), lambda v: 0 <= v <= 1, "must be in [0, 1]")
        self._require(("batch_warmup_start",), lambda v: 0 < v <= 1,
                      "must be in (0, 1]: the first batch as a fraction of batch_size")
        self._require(("decay_frac",), lambda v: 0 < v <= 1,
                      "must be in (0, 1]: the share of the run (after warm-up) spent decaying")
        self._require(("weight_decay",), lambda v: v >= 0, "must be >= 0")
        self._require(("embed_lr_mult",), lambda v: v > 0, "must be > 0")
        self._require(("target_bpb", "stop_at_bpb"), lambda v: v >= 0,
                      "must be >= 0 (validation bits per byte; 0 means off)")
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                _fail(name, getattr(self, name), "must be in [0, 1)")
        if self.grad_clip < 0:
            _fail("grad_clip", self.grad_clip, "must be >= 0 (0 disables clipping)")
        if self.max_minutes < 0:
            _fail("max_minutes", self.max_minutes, "must be >= 0 (0 means no limit)")
        if not 0 <= self.val_fraction < 1:
            _fail("val_fraction", self.val_fraction, "must be in [0, 1)")
        if self.resume and self.overwrite:
            raise ConfigError("resume=True and overwrite=True contradict each other; pick one")
        check_folder_name("run_name", self.run_name)


def check_folder_name(name: str, value: str) -> None:
    """The one check on every name that becomes a folder under an output folder (a run_name,
    a search name): a plain name, so nothing is written or deleted outside that folder."""
    if not value:
        return
    if (any(c in value for c in "/\\\0") or value in (".", "..") or os.path.isabs(value)
            or value != value.strip()):
        _fail(name, value, "must be a plain folder name without path separators, '..' or "
              "surrounding spaces (the folder is created under out_dir)")


LOGGERS = ("tensorboard", "mlflow", "wandb")  # see minlm.loggers


def logger_names(spec: str) -> list[str]:
    """The loggers a ``logger=`` setting names; an unknown name is a ConfigError."""
    names = [n.strip() for n in spec.split(",") if n.strip()]
    unknown = [n for n in names if n not in LOGGERS]
    if unknown:
        raise ConfigError(f"logger={spec!r} is invalid: {', '.join(unknown)} is not one of "
                          f"{', '.join(LOGGERS)} (comma-separated; empty: log.csv only)")
    return names


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]
