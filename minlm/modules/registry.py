"""Registries of token mixers and channel mixers: a new architecture idea is one file.

A token mixer (attention, MLGRU, Mamba, ...) registers itself with ``@register_mixer(name,
...)`` on its class; a channel mixer (MLP, KAN, MoE) with ``@register_channel_mixer``. The
registration declares what every path needs, so nothing else in ``minlm`` lists names:

- ``state``: what cached decoding keeps per layer: ``"kv"`` (keys/values, the context is
  bounded by ``block_size``) or ``"recurrent"`` (a fixed-size state, any length);
- ``options``: the mixer's own settings with their defaults; a config passes them in
  ``ModelConfig.mixer_options`` and the registry refuses unknown names and wrong types;
- ``config_fields``: ``ModelConfig`` fields only this mixer reads (``window``, ``qk_norm``,
  ...): a config that sets one while no layer uses the mixer is refused;
- ``examples``: one non-default value per option and config field; the registry-generated
  tests build a model with each and check forward, causality and cached decoding with it,
  so an option left out of the decoding fast path fails a test;
- ``flops(cfg, T)``: forward FLOPs per token at context T besides the weight matmuls, in
  matrix-type ops (attention scores, convolutions), as MFU counts them and as
  ``torch.utils.flop_counter`` measures them (a test checks they agree); element-wise work
  is not counted; ``memory(cfg, T)``: values per token the mixer's forward saves for
  backward (its input included), checked within 10 % of a measurement by the tests;
- ``validate(cfg)``: extra checks with the same clear errors as the config's own;
- ``forms``: for an option that chooses how the same values are computed (``scan``:
  ``("chunked", "reference")``), the names it may take, ``"reference"`` among them: the plain
  form a learner reads. The registry refuses other values, and the generated tests check
  every other form against the reference in values and gradients, so a fast form cannot be
  added without that check.

Mixers are built as ``cls(cfg, layer_idx)`` (passing ``cfg`` on to ``TokenMixer.__init__``,
which makes a trace count the declared ``flops``) and called as ``mixer(x, positions=, cache=,
key_valid=)``; for one-token decoding they may define ``step(x, positions, cache)`` beside
``forward`` (``TokenMixer.step`` falls back to ``forward`` on a one-token sequence).
"""

from __future__ import annotations

import os
import types
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from minlm.errors import ConfigError
from minlm.tracing import LoggingModule


def _no_extra(cfg, T: int) -> float:
    return 0.0


@dataclass(frozen=True)
class MixerSpec:
    name: str
    cls: type
    state: str = "kv"  # "kv" or "recurrent"
    causal: bool = True  # False: each position sees the whole sequence (bidirectional)
    options: dict[str, Any] = field(default_factory=dict)
    config_fields: tuple[str, ...] = ()
    examples: dict[str, Any] = field(default_factory=dict)
    flops: Callable[[Any, int], float] = _no_extra
    memory: Callable[[Any, int], float] = _no_extra
    validate: Callable[[Any], None] | None = None
    positional: bool = False  # reads RoPE/ALiBi positions (attention does, recurrences don't)
    requires: dict[str, Any] = field(default_factory=dict)  # config fields it needs (tests)
    forms: dict[str, tuple[str, ...]] = field(default_factory=dict)  # option -> form names


@dataclass(frozen=True)
class ChannelMixerSpec:
    name: str
    cls: type  # built as cls(cfg)
    options: dict[str, Any] = field(default_factory=dict)  # in mixer_options, like a mixer's
    config_fields: tuple[str, ...] = ()
    examples: dict[str, Any] = field(default_factory=dict)
    # forward FLOPs per token of the whole channel mixer (matrix-type ops, weights included:
    # a MoE runs only top_k of its experts' weights), as the FLOP counter measures them
    flops: Callable[[Any, int], float] = _no_extra
    memory: Callable[[Any, int], float] = _no_extra
    validate: Callable[[Any], None] | None = None
    requires: dict[str, Any] = field(default_factory=dict)  # e.g. moe: {"n_experts": 4}


@dataclass(frozen=True)
class NormSpec:
    """A norm ``norm=name``: built as ``cls(dim, eps=, affine=, bias=)`` from ``norm_eps``,
    ``norm_affine`` and ``norm_bias``; ``flops``/``memory`` as a channel mixer's (a norm has no
    matrix-type work: 0), per token of width ``cfg.dim``."""
    name: str
    cls: type
    config_fields: tuple[str, ...] = ()
    examples: dict[str, Any] = field(default_factory=dict)
    flops: Callable[[Any, int], float] = _no_extra
    memory: Callable[[Any, int], float] = _no_extra
    validate: Callable[[Any], None] | None = None
    requires: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class PositionSpec:
    """A positional scheme ``position=name``, as up to three parts, each a maker or None:

    - ``input(cfg)``: a module ``pos(x, positions) -> x`` on the embeddings (learned tables,
      sinusoids); its parameters count as lookup tables, not matmul weights;
    - ``rotary(cfg, head_dim)``: a module ``rope(x, positions)`` that attention applies to its
      queries and keys (B, H, T, D);
    - ``bias(cfg, n_heads)``: a module ``bias(q_pos, k_pos) -> (H, T, S)`` added to the scores.

    A scheme with a rotary or bias part acts inside attention, so a model whose mixers read no
    positions (``positional=False``) refuses it. ``flops``/``memory``: per token, of the input
    part (0 for the built-ins: additions only)."""
    name: str
    input: Callable[..., Any] | None = None
    rotary: Callable[..., Any] | None = None
    bias: Callable[..., Any] | None = None
    config_fields: tuple[str, ...] = ()
    examples: dict[str, Any] = field(default_factory=dict)
    flops: Callable[[Any, int], float] = _no_extra
    memory: Callable[[Any, int], float] = _no_extra
    validate: Callable[[Any], None] | None = None
    source: Any = None  # the module or class it is defined by (its file: see _check_new)

    @property
    def in_attention(self) -> bool:
        return self.rotary is not None or self.bias is not None


_MIXERS: dict[str, MixerSpec] = {}
_CHANNEL_MIXERS: dict[str, ChannelMixerSpec] = {}
_NORMS: dict[str, NormSpec] = {}
_POSITIONS: dict[str, PositionSpec] = {}


def register_mixer(name: str, **spec):
    """Class decorator: make ``cls`` the token mixer ``mixer=name`` (see the module doc)."""
    def wrap(cls):
        _check_new(name, _MIXERS, cls)
        unknown = set(spec.get("examples", {})) - set(spec.get("options", {})) \
            - set(spec.get("config_fields", ()))
        if unknown:
            raise ValueError(f"mixer {name!r}: examples for undeclared options {sorted(unknown)}")
        forms = spec.get("forms", {})
        for opt, names in forms.items():
            default = spec.get("options", {}).get(opt)
            if "reference" not in names or default not in names:
                raise ValueError(f"mixer {name!r}: forms of {opt!r} must be declared in options "
                                 f"and name 'reference' and the default; got {names}")
        if forms:
            spec["validate"] = _checking_forms(name, forms, spec.get("validate"))
        _MIXERS[name] = MixerSpec(name, cls, **spec)
        return cls
    return wrap


def _checking_forms(name: str, forms: dict, validate):
    """``validate`` preceded by the check that each form option names a declared form."""
    def check(cfg) -> None:
        for opt, names in forms.items():
            value = option(cfg, name, opt)
            if value not in names:
                raise ConfigError(f"mixer_options {opt}={value!r} is invalid for {name}: must be "
                                  f"one of {', '.join(map(repr, names))}")
        if validate is not None:
            validate(cfg)
    return check


def _registering(name: str, table: dict, spec_type: type, spec: dict):
    """The class decorator that checks ``cls`` and its examples, then enters it in ``table``."""
    def wrap(cls):
        _check_new(name, table, cls)
        _check_examples(name, spec)
        table[name] = spec_type(name, cls, **spec)
        return cls
    return wrap


def register_channel_mixer(name: str, **spec):
    """Class decorator: make ``cls`` the channel mixer ``mlp=name``; its ``options`` are read
    from ``mixer_options`` with the same checks as a token mixer's."""
    return _registering(name, _CHANNEL_MIXERS, ChannelMixerSpec, spec)


def register_norm(name: str, **spec):
    """Class decorator: make ``cls`` the norm ``norm=name`` (see ``NormSpec``)."""
    return _registering(name, _NORMS, NormSpec, spec)


def register_position(name: str, source=None, **spec) -> None:
    """Make ``name`` a positional scheme (see ``PositionSpec``). Not a class decorator: a
    scheme is up to three makers; ``source`` (a module or class) says where it is defined,
    so registering it again from the same file replaces it."""
    maker = next((m for m in (spec.get("input"), spec.get("rotary"), spec.get("bias")) if m),
                 None)
    origin = source or maker or register_position
    _check_new(name, _POSITIONS, origin)
    _check_examples(name, spec)
    _POSITIONS[name] = PositionSpec(name, source=origin, **spec)


def _check_examples(name: str, spec: dict) -> None:
    unknown = set(spec.get("examples", {})) - set(spec.get("options", {})) \
        - set(spec.get("config_fields", ()))
    if unknown:
        raise ValueError(f"{name!r}: examples for undeclared options {sorted(unknown)}")


def defined_in(spec) -> str:
    """The module that registered ``spec`` (any registry's entry): its class's, or for a
    positional scheme its ``source``'s."""
    owner = getattr(spec, "cls", None) or spec.source
    return owner.__name__ if isinstance(owner, types.ModuleType) else owner.__module__


def _source(cls) -> tuple[str, str]:
    """Where ``cls`` is defined: (its file, resolved, else its module name; its qualname)."""
    import sys

    if isinstance(cls, types.ModuleType):
        return str(Path(cls.__file__).resolve()) if cls.__file__ else cls.__name__, ""
    file = getattr(sys.modules.get(cls.__module__), "__file__", None)
    return (str(Path(file).resolve()) if file else cls.__module__), cls.__qualname__


def _check_new(name: str, table: dict, cls) -> None:
    old = table.get(name)
    if table is _POSITIONS and old is not None:
        old = types.SimpleNamespace(cls=old.source)
    # the same class from the same file again replaces the entry: a notebook reloading an
    # experiment, or its package imported under two names (``python -m experiments.x.run``
    # as ``experiments.x``, then ``experiment=x`` as the loader's module)
    if old is not None and _source(old.cls) != _source(cls):
        raise ValueError(f"{name!r} is already registered by {old.cls.__module__}."
                         f"{old.cls.__qualname__}; pick another name")
    if not name.isidentifier() or name != name.lower():
        raise ValueError(f"mixer name {name!r} must be a lower-case identifier")


# No loader is needed for the built-ins: importing this module (``minlm.modules.registry``)
# runs the package's ``__init__`` first, and that imports every built-in file, so the tables
# are full before anyone can ask them.

def mixers() -> dict[str, MixerSpec]:
    """Every registered token mixer by name (the built-ins plus loaded experiments)."""
    return dict(_MIXERS)


def channel_mixers() -> dict[str, ChannelMixerSpec]:
    return dict(_CHANNEL_MIXERS)


def mixer_spec(name: str, field_name: str = "mixer") -> MixerSpec:
    """The registration of ``name``, or a ConfigError listing what is registered."""
    table = mixers()
    spec = table.get(name)
    if spec is None:
        raise ConfigError(f"{field_name}={name!r} is not a registered token mixer; registered: "
                          f"{', '.join(sorted(table))} (an experiment registers more: "
                          "experiment=<name or path>)")
    return spec


def registration(cls: type) -> MixerSpec | None:
    """The token mixer registration of ``cls`` or of the nearest registered class it derives
    from (None if there is none)."""
    by_class = {spec.cls: spec for spec in _MIXERS.values()}
    return next((by_class[c] for c in cls.__mro__ if c in by_class), None)


def norms() -> dict[str, NormSpec]:
    """Every registered norm by name (the built-ins plus loaded experiments)."""
    return dict(_NORMS)


def positions() -> dict[str, PositionSpec]:
    """Every registered positional scheme by name."""
    return dict(_POSITIONS)


def _lookup(table: dict, name: str, field_name: str, what: str):
    if name not in table:
        raise ConfigError(f"{field_name}={name!r} is not a registered {what}; registered: "
                          f"{', '.join(sorted(table))} (an experiment registers more: "
                          "experiment=<name or path>)")
    return table[name]


def norm_spec(name: str, field_name: str = "norm") -> NormSpec:
    return _lookup(_NORMS, name, field_name, "norm")


def position_spec(name: str, field_name: str = "position") -> PositionSpec:
    return _lookup(_POSITIONS, name, field_name, "positional scheme")


def make_norm(cfg, dim: int | None = None):
    """The config's norm over ``dim`` (default ``cfg.dim``) channels."""
    return _NORMS[cfg.norm].cls(dim or cfg.dim, eps=cfg.norm_eps, affine=cfg.norm_affine,
                                bias=cfg.norm_bias)


def make_position(cfg, part: str, *args):
    """Part ``part`` (``"input"``, ``"rotary"`` or ``"bias"``) of the config's positional
    scheme, built from ``cfg`` and ``args`` (head size, head count), or None where the
    scheme has no such part: the one place attention and the model get positions from."""
    maker = getattr(_POSITIONS[cfg.position], part)
    return maker(cfg, *args) if maker is not None else None


def channel_mixer_spec(name: str, field_name: str = "mlp") -> ChannelMixerSpec:
    table = channel_mixers()
    if name not in table:
        raise ConfigError(f"{field_name}={name!r} is not a registered channel mixer; "
                          f"registered: {', '.join(sorted(table))}")
    return table[name]


def check_options(options: dict[str, Any], specs: list) -> None:
    """Refuse ``mixer_options`` that no mixer in use (token or channel) declares, or of the
    wrong type."""
    declared: dict[str, Any] = {}
    for s in specs:
        declared.update(s.options)
    for key, value in options.items():
        if key not in declared:
            names = ", ".join(s.name for s in specs  # channel mixers only where they have some
                              if isinstance(s, MixerSpec) or s.options)
            valid = ", ".join(sorted(declared)) or "none"
            raise ConfigError(f"mixer_options has {key}={value!r}, which no mixer in use "
                              f"({names}) declares; valid options: {valid}")
        default = declared[key]
        kind = float if isinstance(default, float) else type(default)
        ok = isinstance(value, kind) and not (kind is int and isinstance(value, bool))
        if kind is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not ok:
            raise ConfigError(f"mixer_options {key}={value!r} is invalid: must be of type "
                              f"{kind.__name__} (default {default!r})")


def option(cfg, mixer: str, name: str):
    """Option ``name`` of mixer ``mixer`` (a token mixer's name, else a channel mixer's) in
    ``cfg``: ``cfg.mixer_options[name]`` or the mixer's declared default."""
    spec = _MIXERS[mixer] if mixer in _MIXERS else _CHANNEL_MIXERS[mixer]
    return cfg.mixer_options.get(name, spec.options[name])


class TokenMixer(LoggingModule):
    """Base of token mixers: ``forward(x, positions=, cache=, key_valid=)`` over a sequence,
    and ``step(x, positions, cache)`` for one new token per row during cached decoding.

    The default ``step`` runs ``forward`` on a one-token sequence, so a new mixer decodes
    correctly with nothing more; a mixer overrides it only to go faster, and the
    registry-generated tests prove the override equal to ``forward``.
    """

    def __init__(self, cfg=None):
        super().__init__()
        self.flops_config = cfg  # what the registration's ``flops(cfg, T)`` reads

    def extra_flops(self, args: tuple, output: Any) -> int:
        """The registration's ``flops(cfg, T)`` for each of this call's B x T tokens, so a
        trace shows the figure MFU counts; 0 for a mixer built without its config."""
        spec = registration(type(self))
        x = args[0] if args else None
        if spec is None or self.flops_config is None or not isinstance(x, torch.Tensor):
            return 0
        B, T = x.shape[0], x.shape[1]
        return int(B * T * spec.flops(self.flops_config, T))

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache,
             residual: torch.Tensor | None = None,
             gain: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C) -> (B, C), plus ``residual`` (B, C) if given (the block's stream, which a
        fast step adds in its output product); ``positions`` (1,) shared or (B, 1) per row.
        ``gain`` (C,) if given scales x first: the weight of the RMSNorm in front, which a fast
        step folds into its input product (``fastpath.joint_linear``)."""
        if gain is not None:
            x = x * gain
        y = self.forward(x.unsqueeze(1), positions=positions, cache=cache).squeeze(1)
        return y if residual is None else residual + y


EXPERIMENTS_DIR = Path(__file__).resolve().parents[2] / "experiments"
TRUST_HINT = ("if you trust its code, load it with trust_experiment=True (command line: "
              "--trust-experiment)")


def experiment_folders() -> list[Path]:
    """Where experiments are found by name: the repository's ``experiments/``, then each
    folder of ``$MINLM_EXPERIMENTS_PATH`` (separated like ``PATH``), for experiments kept
    outside the repository."""
    extra = os.environ.get("MINLM_EXPERIMENTS_PATH", "")
    return [EXPERIMENTS_DIR] + [Path(p).expanduser() for p in extra.split(os.pathsep) if p]


def local_experiment(name: str) -> Path | None:
    """The ``__init__.py`` of the experiment package called ``name`` in one of the
    experiment folders, or None: a plain name (an identifier) only, never a path."""
    if not name.isidentifier():
        return None
    for folder in experiment_folders():
        init = folder / name / "__init__.py"
        if init.is_file():
            return init
    return None


def check_recorded_experiment(name: str, where: str, trust: bool = False) -> None:
    """The one check before a config read from a file (a run folder, a packed model) is
    built: its ``experiment`` is imported, so its code runs, only when it names a local
    experiment package by name, or when the caller trusts it explicitly.

    Why: run folders are shared as data (safetensors, weights-only checkpoints); a recorded
    path would otherwise run whatever file the folder's author chose.
    """
    if not name or trust or local_experiment(name) is not None:
        return
    folders = ", ".join(str(f) for f in experiment_folders())
    what = ("is a path, not the name of an experiment" if not name.isidentifier()
            else "is not an experiment package")
    raise ConfigError(f"{where} records experiment={name!r}, which {what} in {folders}; its "
                      f"code was not imported (a run folder may come from anyone); {TRUST_HINT}")


def load_experiment(name_or_path: str) -> str:
    """Import an experiment package so its mixers and presets register; returns its module name.

    ``name_or_path``: a package name in the experiment folders (``"diffattn"``), found there
    first, or a path to a package folder or a ``.py`` file anywhere, which is the caller's own
    choice (a config read from a file passes ``check_recorded_experiment`` first). Importing
    twice is a no-op.
    """
    import importlib.util
    import sys

    path = local_experiment(name_or_path) or Path(name_or_path).expanduser()
    if path.is_dir():
        path = path / "__init__.py"
    if not path.is_file():
        names = sorted(p.parent.name for f in experiment_folders()
                       for p in f.glob("*/__init__.py"))
        folders = ", ".join(str(f) for f in experiment_folders())
        raise ConfigError(f"experiment={name_or_path!r} is neither a folder of {folders} "
                          f"nor a path to a package or .py file; available: "
                          f"{', '.join(names) or 'none'}")
    module_name = "minlm_experiment_" + (path.parent.name if path.name == "__init__.py"
                                         else path.stem)
    if module_name in sys.modules:
        return module_name
    spec = importlib.util.spec_from_file_location(
        module_name, path, submodule_search_locations=[str(path.parent)]
        if path.name == "__init__.py" else None)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException as e:
        del sys.modules[module_name]
        if isinstance(e, SyntaxError):  # the experiment's file is input: name file and line
            raise ConfigError(f"experiment={name_or_path!r}: {e.filename}:{e.lineno}: {e.msg} "
                              "(a syntax error in the experiment's code; fix it there)") from e
        if isinstance(e, ValueError) or not isinstance(e, Exception):
            raise  # its own clear errors (a name registered twice), and Ctrl-C, as they are
        raise ConfigError(f"experiment={name_or_path!r} failed while importing, at "
                          f"{_where_in(e, path)}: {type(e).__name__}: {e}; fix the "
                          "experiment's code (--debug shows the traceback)") from e
    return module_name


def _where_in(error: BaseException, path: Path) -> str:
    """``file:line`` of the innermost frame of ``error`` inside the experiment (its package
    folder, or its one file), else the innermost frame of all."""
    import traceback

    root = path.parent if path.name == "__init__.py" else path
    frames = traceback.extract_tb(error.__traceback__)
    inside = [f for f in frames if Path(f.filename) == root or root in Path(f.filename).parents]
    frame = (inside or frames)[-1]
    return f"{frame.filename}:{frame.lineno}"
