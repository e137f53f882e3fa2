"""Shape tracing: follow every tensor through every module, as a tree or a DataFrame.

Tracing is done with forward hooks registered on every module of ``named_modules()`` for the
duration of a ``with trace(model) as t:`` block, so plain ``nn.Linear`` and third-party modules
are traced too, and nothing is registered (nor costs anything) outside the block. Inside a
``forward``, tensors that are not module outputs (the head split, the attention scores) are
exposed by passing them through a ``Probe``, an identity module that the tracer sees.
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable, Iterator

import torch
from torch import nn

_active_traces = 0


def enabled() -> bool:
    """True while a trace is recording; modules use it to compute extra views for probes."""
    return _active_traces > 0


class LoggingModule(nn.Module):
    """Base class of every minlm module: adds ``trace()`` and probe-point helpers."""

    def trace(self, *args, capture: bool | Iterable[str] = False, **kwargs) -> "Trace":
        """Run ``self(*args, **kwargs)`` under a trace and return the trace."""
        with trace(self, capture=capture) as t, torch.no_grad():
            self(*args, **kwargs)
        return t

    def extra_flops(self, args: tuple, output: Any) -> int:
        """FLOPs done here that no child module accounts for (e.g. attention matmuls)."""
        return 0


class Probe(LoggingModule):
    """An identity whose only job is to make an intermediate tensor visible to ``trace()``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


class Identity(LoggingModule):
    """Stands in for a disabled part; accepts and ignores extra arguments."""

    def forward(self, x, *args, **kwargs):
        return x


@dataclass
class TraceRow:
    call: int  # call order
    path: str  # dotted module path; "" is the root
    module: str  # class name
    depth: int
    in_shapes: list[tuple]
    out_shapes: list[tuple]
    dtype: str
    out_min: float = math.nan
    out_max: float = math.nan
    out_mean: float = math.nan
    params: int = 0
    flops: int = 0  # this call and everything it called

    @property
    def name(self) -> str:
        if not self.path:
            return self.module
        parts = self.path.split(".")
        return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def _tensors(obj: Any) -> list[torch.Tensor]:
    if isinstance(obj, torch.Tensor):
        return [obj]
    if isinstance(obj, (list, tuple)):
        return [t for o in obj for t in _tensors(o)]
    if isinstance(obj, dict):
        return [t for o in obj.values() for t in _tensors(o)]
    return []


def _linear_flops(module: nn.Module, args: tuple) -> int:
    if isinstance(module, nn.Linear) and args and isinstance(args[0], torch.Tensor):
        rows = args[0].numel() // module.in_features
        return 2 * rows * module.in_features * module.out_features
    return 0


class Trace:
    """What one traced forward pass did: rows in call order, printable as an indented tree."""

    def __init__(self, root_name: str):
        self.root_name = root_name
        self.rows: list[TraceRow] = []
        self.tensors: dict[str, torch.Tensor] = {}

    def to_pandas(self):
        import pandas as pd

        records = []
        for r in self.rows:
            d = asdict(r)
            d["name"] = r.name
            d["in_shapes"] = [tuple(s) for s in r.in_shapes]
            d["out_shapes"] = [tuple(s) for s in r.out_shapes]
            records.append(d)
        cols = ["call", "path", "name", "module", "depth", "in_shapes", "out_shapes", "dtype",
                "out_min", "out_max", "out_mean", "params", "flops"]
        return pd.DataFrame.from_records(records, columns=cols)

    def find(self, pattern: str) -> list[TraceRow]:
        """Rows whose path ends with ``pattern`` (e.g. ``"attn.q_heads"``), in call order."""
        return [r for r in self.rows if r.path == pattern or r.path.endswith("." + pattern)]

    def format(self, stats: bool = True, max_depth: int | None = None) -> str:
        return format_tree(self.rows, stats=stats, max_depth=max_depth)

    def __str__(self) -> str:
        return self.format()

    def __repr__(self) -> str:
        return f"Trace({self.root_name}, {len(self.rows)} calls)"

    def _repr_html_(self) -> str:  # notebooks show the tree in a monospace block
        import html

        return f"<pre style='font-size:12px'>{html.escape(self.format())}</pre>"


def _shape_str(shapes: list[tuple]) -> str:
    if not shapes:
        return "-"
    return " ".join("(" + ", ".join(str(d) for d in s) + ")" for s in shapes)


def _human(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{int(n)}"


def format_tree(rows: list[TraceRow], stats: bool = True, max_depth: int | None = None) -> str:
    """An indented tree, one line per module call, that follows the shapes step by step."""
    shown = [r for r in rows if max_depth is None or r.depth <= max_depth]
    if not shown:
        return "(no module calls recorded)"
    names = ["  " * r.depth + r.name for r in shown]
    w_name = max(len(n) for n in names)
    w_mod = max(len(r.module) for r in shown)
    w_in = max(len(_shape_str(r.in_shapes)) for r in shown)
    w_out = max(len(_shape_str(r.out_shapes)) for r in shown)
    lines = [
        f"{'module':<{w_name}}  {'class':<{w_mod}}  {'input':<{w_in}}    {'output':<{w_out}}  "
        f"{'dtype':<8} {'params':>8} {'flops':>8}" + ("  min / mean / max" if stats else "")
    ]
    for name, r in zip(names, shown):
        line = (
            f"{name:<{w_name}}  {r.module:<{w_mod}}  {_shape_str(r.in_shapes):<{w_in}} -> "
            f"{_shape_str(r.out_shapes):<{w_out}}  {r.dtype:<8} {_human(r.params):>8} "
            f"{_human(r.flops):>8}"
        )
        if stats and not math.isnan(r.out_mean):
            line += f"  {r.out_min:.3g} / {r.out_mean:.3g} / {r.out_max:.3g}"
        lines.append(line.rstrip())
    return "\n".join(lines)


@contextlib.contextmanager
def trace(model: nn.Module, capture: bool | Iterable[str] = False) -> Iterator[Trace]:
    """Record every module call made inside the block.

    ``capture=True`` keeps a detached copy of every ``Probe`` output in ``t.tensors`` (keyed by
    path); a list of path suffixes keeps only those. A ``torch.compile``d model is traced
    through its original module.
    """
    global _active_traces
    model = getattr(model, "_orig_mod", model)
    t = Trace(type(model).__name__)
    stack: list[TraceRow] = []
    handles = []
    wanted = None if capture is True else (set(capture) if capture else set())

    def keep(path: str, module: nn.Module) -> bool:
        if wanted is None:
            return isinstance(module, Probe)
        return any(path == w or path.endswith("." + w) for w in wanted)

    def pre_hook(path: str):
        def hook(module, args, kwargs):
            ins = _tensors(args) + _tensors(kwargs)
            row = TraceRow(
                call=len(t.rows), path=path, module=type(module).__name__, depth=len(stack),
                in_shapes=[tuple(x.shape) for x in ins], out_shapes=[], dtype="",
                params=sum(p.numel() for p in module.parameters()),
            )
            t.rows.append(row)
            stack.append(row)

        return hook

    def post_hook(path: str):
        def hook(module, args, kwargs, output):
            row = stack.pop()
            outs = _tensors(output)
            row.out_shapes = [tuple(x.shape) for x in outs]
            if outs:
                first = outs[0]
                row.dtype = str(first.dtype).replace("torch.", "")
                if first.numel() and (first.is_floating_point() or not first.is_complex()):
                    with torch.no_grad():
                        f = first.detach().float()
                        f = f[torch.isfinite(f)]  # masked scores hold -inf
                        if f.numel():
                            row.out_min, row.out_max = f.min().item(), f.max().item()
                            row.out_mean = f.mean().item()
            own = _linear_flops(module, args)
            if isinstance(module, LoggingModule):
                own += int(module.extra_flops(args, output))
            row.flops += own
            if stack:
                stack[-1].flops += row.flops
            if outs and keep(path, module):
                t.tensors[path] = outs[0].detach().clone()

        return hook

    was_training = model.training
    try:
        for path, module in model.named_modules():
            handles.append(module.register_forward_pre_hook(pre_hook(path), with_kwargs=True))
            handles.append(module.register_forward_hook(post_hook(path), with_kwargs=True))
        _active_traces += 1
        yield t
    finally:
        _active_traces -= 1
        for h in handles:
            h.remove()
        model.train(was_training)


def hook_count(model: nn.Module) -> int:
    """Forward hooks currently registered anywhere in ``model`` (0 when nothing traces it)."""
    model = getattr(model, "_orig_mod", model)
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


__all__ = ["LoggingModule", "Probe", "Identity", "Trace", "TraceRow", "trace", "enabled",
           "format_tree", "hook_count"]
