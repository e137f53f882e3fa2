"""Residual blocks: the plain pre-norm block as two lines of code, layouts for the rest.

The default ``block_spec`` builds ``PreNormBlock``, whose forward is what a learner expects::

    x = x + self.mixer(self.norm1(x))
    x = x + self.mlp(self.norm2(x))

Other layouts are written as a layout string, interpreted by ``LayoutBlock``. Steps are joined
by ``>`` or ``->`` (case-insensitive) and apply to a running tensor that starts as the residual
stream; ``+`` adds the running tensor back onto the stream (which becomes the sum), and steps
after it act on the stream. Spaces separate groups: at the end of a group the running tensor
becomes the stream (so ``attn>+>norm`` is a post-norm). ``a|b`` runs two steps on the same
input and sums them. Steps: ``norm``, ``mixer`` (or ``attn``: the config's ``mixer``), any
registered mixer name (``attention``, ``mlgru``, ``mamba``, ...: that mixer in this layer),
``mlp`` (the config's channel mixer) and ``moe`` (a mixture of experts; then ``mlp`` steps
stay dense). ``block_spec`` may also be a list of layouts, one per layer or cycling::

    "norm>attn>+ norm>mlp>+"                    pre-norm (Llama, GPT-2): PreNormBlock
    "Norm->Attn->+->Norm->MLP->+"               the same, in the seed projects' notation
    "norm>attn>norm>+ norm>mlp>norm>+"          extra post-attention / post-MLP norms (Grok)
    "norm>attn|mlp>+"                           parallel attention and MLP (GPT-J)
    "attn>+>norm mlp>+>norm"                    post-norm (the original Transformer)
    ["Norm->Attn->+->Norm->MLP->+", "Norm->MoE->+"]   dense and MoE layers alternating
    ["norm>griffin>+ norm>mlp>+"] * 2 + ["norm>attention>+ norm>mlp>+"]   a hybrid

Dimension letters: B batch, T time, C model width.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from minlm.errors import ConfigError
from minlm.modules.norm import split_step
from minlm.tracing import LoggingModule

KEYWORDS = ("norm", "mixer", "attn", "mlp", "moe", "+")  # every other step names a mixer
_DEFAULT_LAYOUTS = ([["norm", "mixer", "+"], ["norm", "mlp", "+"]],
                    [["norm", "mixer", "+", "norm", "mlp", "+"]])


def _normalise(spec: str) -> str:
    spec = spec.lower().replace("->", ">")
    return re.sub(r"\s*([>|])\s*", r"\1", spec.strip())


def parse_block_spec(spec: str) -> list[list[str]]:
    """One layout string as groups of steps (``attn`` read as ``mixer``); unknown steps are
    refused with the valid list."""
    from minlm.modules.registry import mixers

    groups = _normalise(spec).split()
    if not groups:
        raise ConfigError(f"block_spec={spec!r} is empty; e.g. 'norm>attn>+ norm>mlp>+'")
    names = mixers()
    parsed = []
    for g in groups:
        steps = ["|".join("mixer" if p == "attn" else p for p in s.split("|"))
                 for s in g.split(">")]
        for s in steps:
            for part in s.split("|"):
                if part not in KEYWORDS and part not in names:
                    raise ConfigError(
                        f"block_spec={spec!r} has unknown step {part!r}; valid steps are "
                        f"{', '.join(KEYWORDS)} or a mixer ({', '.join(sorted(names))}), joined "
                        "by '>' or '->', parallel branches by '|'")
            if "|" in s and "+" in s.split("|"):
                raise ConfigError(f"block_spec={spec!r}: '+' cannot be a parallel branch")
        parsed.append(steps)
    return parsed


def layer_layouts(cfg) -> list[list[list[str]]]:
    """The parsed layout of every layer: ``block_spec`` is one layout or a list that cycles."""
    specs = [cfg.block_spec] if isinstance(cfg.block_spec, str) else list(cfg.block_spec)
    if not specs:
        raise ConfigError("block_spec=[] is empty; give one layout, or a list of them")
    parsed = [parse_block_spec(s) for s in specs]
    return [parsed[i % len(parsed)] for i in range(cfg.n_layers)]


def layer_mixers(cfg, layer_idx: int) -> list[str]:
    """Names of the token mixers layer ``layer_idx`` uses (``mixer``/``attn``: ``cfg.mixer``)."""
    used = []
    for group in layer_layouts(cfg)[layer_idx]:
        for step in group:
            for part in step.split("|"):
                name = cfg.mixer if part == "mixer" else part
                if (part not in KEYWORDS or part == "mixer") and name not in used:
                    used.append(name)
    return used


def layout_mixers(cfg) -> list[str]:
    """Names of the token mixers the layers use (``mixer``/``attn`` steps are ``cfg.mixer``)."""
    used = []
    for i in range(cfg.n_layers):
        used += [name for name in layer_mixers(cfg, i) if name not in used]
    return used


def check_decodable(cfg) -> None:
    """The one check before left-to-right cached decoding: a bidirectional (``causal=False``)
    mixer sees tokens that do not exist yet while decoding, so its text would be wrong."""
    from minlm.modules.registry import mixer_spec

    for name in layout_mixers(cfg):
        if not mixer_spec(name).causal:
            raise ConfigError(f"mixer={name!r} is bidirectional (causal=False): it cannot decode "
                              "left to right with a cache; sample it with its experiment's own "
                              "sampler (full forwards over the whole sequence)")


def uses_moe_step(cfg) -> bool:
    return any("moe" in s.split("|") for layout in layer_layouts(cfg) for g in layout for s in g)


class Residual(LoggingModule):
    """The residual add of a layout, a module of its own so a trace shows it as a step."""

    def forward(self, stream: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return stream + branch


def _is_mixer(kind: str) -> bool:
    return kind not in ("norm", "mlp", "moe", "+")


class Parallel(LoggingModule):
    """Runs several branches on one input and sums their outputs."""

    def __init__(self, branches: dict[str, nn.Module], kinds: dict[str, str],
                 slots: dict[str, int]):
        super().__init__()
        self.branches = nn.ModuleDict(branches)
        self.kinds = kinds  # branch name -> step kind
        self.slots = slots  # mixer branch name -> its decoding-cache slot in the layer

    def forward(self, x: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        out = 0
        for name, m in self.branches.items():
            if _is_mixer(self.kinds[name]):
                out = out + m(x, **_in_slot(mixer_kwargs, self.slots[name]))
            else:
                out = out + m(x)
        return out

    def step(self, x: torch.Tensor, positions, cache, **mixer_kwargs) -> torch.Tensor:
        out = 0
        for name, m in self.branches.items():
            out = out + (m.step(x, positions, cache.slot(self.slots[name]), **mixer_kwargs)
                         if _is_mixer(self.kinds[name]) else _one(m, x))
        return out


def _in_slot(mixer_kwargs: dict, slot: int) -> dict:
    """The mixer arguments with the layer's cache narrowed to the mixer's own slot: two
    mixers of one layer (a hybrid layout) must not share keys/values or a state."""
    cache = mixer_kwargs.get("cache")
    return mixer_kwargs if cache is None or slot == 0 else {**mixer_kwargs,
                                                            "cache": cache.slot(slot)}


def _one(module: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None,
         gain: torch.Tensor | None = None):
    """A position-wise module on one token (B, C): its ``step`` if it has one, else forward;
    plus ``residual`` if given (a channel mixer's ``step`` takes it into its last product);
    ``gain`` (C,) if given scales x first (a channel mixer's ``step`` folds it into its first)."""
    step = getattr(module, "step", None)
    if step is None:
        y = module((x if gain is None else x * gain).unsqueeze(1)).squeeze(1)
        return y if residual is None else residual + y
    if gain is not None:
        return step(x, residual=residual, gain=gain)
    return step(x) if residual is None else step(x, residual=residual)


class PreNormBlock(LoggingModule):
    """The pre-norm residual block of GPT-2 and Llama."""

    def __init__(self, norm1: nn.Module, mixer: nn.Module, norm2: nn.Module, mlp: nn.Module):
        super().__init__()
        self.norm1, self.mixer, self.norm2, self.mlp = norm1, mixer, norm2, mlp

    def forward(self, x: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        x = x + self.mixer(self.norm1(x), **mixer_kwargs)  # (B, T, C)
        return x + self.mlp(self.norm2(x))

    def step(self, x: torch.Tensor, positions, cache, **mixer_kwargs) -> torch.Tensor:
        """One token per row, x (B, C): the same computation through each module's ``step``,
        each norm's gain folded into the product after it (``norm.split_step``);
        ``mixer_kwargs`` (a value embedding) go to the mixer, as in ``forward``."""
        parts = self._modules  # the same children as self.norm1 ..., without nn.Module's lookup
        h, gain = split_step(parts["norm1"], x)
        x = parts["mixer"].step(h, positions, cache, residual=x, gain=gain,
                                **mixer_kwargs)  # x + ...
        h, gain = split_step(parts["norm2"], x)
        return _one(parts["mlp"], h, residual=x, gain=gain)


class LayoutBlock(LoggingModule):
    """A block built from a parsed layout; children are named by kind: norm1, norm2, mixer,
    mlp, moe, add1, ... (a second mixer of one layer is mixer2)."""

    def __init__(self, layout: list[list[str]], make, layer_idx: int = 0):
        super().__init__()
        self.plan: list[list[tuple[str, nn.Module, int]]] = []  # groups of (kind, module, slot)
        counts: dict[str, int] = {}
        slots = iter(range(1 << 30))  # each mixer of the layer gets its own cache slot

        def key_for(kind: str) -> str:
            base = {"+": "add", "parallel": "parallel"}.get(kind, "norm" if kind == "norm"
                                                          else "mlp" if kind == "mlp"
                                                          else "moe" if kind == "moe" else "mixer")
            counts[base] = counts.get(base, 0) + 1
            numbered = base in ("norm", "add")
            return f"{base}{counts[base]}" if numbered or counts[base] > 1 else base

        for group in layout:
            plan = []
            for step in group:
                if "|" in step:
                    kinds, branches, branch_slots = {}, {}, {}
                    for part in step.split("|"):
                        name = key_for(part)
                        kinds[name], branches[name] = part, make(part, layer_idx)
                        if _is_mixer(part):
                            branch_slots[name] = next(slots)
                    module = Parallel(branches, kinds, branch_slots)
                    self.add_module(key_for("parallel"), module)
                    plan.append(("parallel", module, 0))
                    continue
                module = Residual() if step == "+" else make(step, layer_idx)
                self.add_module(key_for(step), module)  # steps are direct children
                plan.append((step, module, next(slots) if _is_mixer(step) else 0))
            self.plan.append(plan)

    def forward(self, x: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        stream = x
        for group in self.plan:
            h = stream
            for kind, step, slot in group:
                if kind == "+":
                    h = stream = step(stream, h)
                elif kind == "parallel":
                    h = step(h, **mixer_kwargs)
                elif _is_mixer(kind):
                    h = step(h, **_in_slot(mixer_kwargs, slot))
                else:
                    h = step(h)
            stream = h
        return stream

    def step(self, x: torch.Tensor, positions, cache, **mixer_kwargs) -> torch.Tensor:
        stream = x  # (B, C): one token per row
        for group in self.plan:
            h = stream
            for kind, step, slot in group:
                if kind == "+":
                    h = stream = stream + h
                elif kind == "parallel":
                    h = step.step(h, positions, cache, **mixer_kwargs)
                elif _is_mixer(kind):
                    h = step.step(h, positions, cache.slot(slot), **mixer_kwargs)
                else:
                    h = _one(step, h)
            stream = h
        return stream
