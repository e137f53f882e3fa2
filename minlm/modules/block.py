"""A residual block assembled from a spec string, so block layouts are config, not code.

A spec is groups separated by spaces; each group is steps separated by ``>``, applied to a
running tensor that starts as the residual stream. ``+`` adds the running tensor back onto the
stream (and the stream becomes the sum); steps after ``+`` act on the stream. ``a|b`` runs two
steps on the same input and sums them (a parallel block). Examples::

    "norm>attn>+ norm>mlp>+"                 pre-norm (Llama, GPT-2)
    "norm>attn>norm>+ norm>mlp>norm>+"       extra post-attention / post-MLP norms (Grok)
    "norm>attn|mlp>+"                        parallel attention and MLP (GPT-J)
    "attn>+>norm mlp>+>norm"                 post-norm (the original Transformer)
"""

from __future__ import annotations

import torch
from torch import nn

from minlm.tracing import LoggingModule

STEPS = ("norm", "attn", "mlp", "+")


def parse_block_spec(spec: str) -> list[list[str]]:
    """Split a spec into groups of steps, rejecting unknown steps with the valid list."""
    from minlm.config import ConfigError

    groups = [g for g in spec.split() if g]
    if not groups:
        raise ConfigError(f"block_spec={spec!r} is empty; e.g. 'norm>attn>+ norm>mlp>+'")
    parsed = []
    for g in groups:
        steps = g.split(">")
        for s in steps:
            for part in s.split("|"):
                if part not in STEPS:
                    raise ConfigError(
                        f"block_spec={spec!r} has unknown step {part!r}; valid steps are "
                        f"{', '.join(STEPS)} (joined by '>', parallel branches by '|')"
                    )
            if "|" in s and "+" in s.split("|"):
                raise ConfigError(f"block_spec={spec!r}: '+' cannot be a parallel branch")
        parsed.append(steps)
    return parsed


class Residual(LoggingModule):
    """The residual add, a module of its own so a trace shows it as a step."""

    def forward(self, stream: torch.Tensor, branch: torch.Tensor) -> torch.Tensor:
        return stream + branch


class Parallel(LoggingModule):
    """Runs several branches on one input and sums their outputs."""

    def __init__(self, branches: dict[str, nn.Module]):
        super().__init__()
        self.branches = nn.ModuleDict(branches)

    def forward(self, x: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        out = 0
        for name, m in self.branches.items():
            out = out + (m(x, **mixer_kwargs) if name.startswith("attn") else m(x))
        return out


class Block(LoggingModule):
    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__()
        from minlm.modules import make_step  # the registry of step builders

        self.plan: list[list[tuple[str, nn.Module]]] = []  # groups of (kind, step module)
        counts: dict[str, int] = {}

        def key_for(kind: str) -> str:
            counts[kind] = counts.get(kind, 0) + 1
            base = "add" if kind == "+" else kind
            return base if kind in ("attn", "mlp") and counts[kind] == 1 else f"{base}{counts[kind]}"

        for group in parse_block_spec(cfg.block_spec):
            plan = []
            for step in group:
                if "|" in step:
                    names = step.split("|")
                    key = key_for("parallel")
                    module = Parallel({n: make_step(n, cfg, layer_idx) for n in names})
                    self.add_module(key, module)  # steps are direct children: blocks.0.attn
                    plan.append(("parallel", module))
                    continue
                module = Residual() if step == "+" else make_step(step, cfg, layer_idx)
                self.add_module(key_for(step), module)
                plan.append((step, module))
            self.plan.append(plan)

    def forward(self, x: torch.Tensor, **mixer_kwargs) -> torch.Tensor:
        stream = x
        for group in self.plan:
            h = stream
            for kind, step in group:
                if kind == "+":
                    h = stream = step(stream, h)
                elif kind in ("attn", "parallel"):
                    h = step(h, **mixer_kwargs)
                else:
                    h = step(h)
            stream = h
        return stream
