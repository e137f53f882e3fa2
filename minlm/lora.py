"""LoRA (Hu et al. 2021): low-rank adapters on the linear layers of a frozen model.

Written here rather than trained through ``peft``: it is twenty lines on top of ``nn.Linear``
that training, tracing, DPO's reference and merging share, and merging back into the plain
``LM`` keeps run folders library-free. The adapters are saved in PEFT's own format as well
(``minlm.adapters``), so peft loads them on a run's transformers export.

Dimension letters: R LoRA rank.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from minlm.config import ConfigError
from minlm.tracing import LoggingModule


class LoRALinear(LoggingModule):
    """``base(x) + (alpha / R) * x A^T B^T`` with ``base`` frozen; B starts at zero, so the
    wrapped layer first computes exactly what ``base`` does."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight
        like = {"device": w.device, "dtype": w.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))  # (R, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))  # (out, R)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises
        self.drop = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        low = F.linear(self.drop(x), self.lora_a)  # (..., R)
        return y + F.linear(low, self.lora_b) * self.scale  # (..., out)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight."""
        self.base.weight += self.scale * (self.lora_b @ self.lora_a)  # (out, R) @ (R, in)
        return self.base


def _lora_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like layers inside the blocks, by full name (embeddings and the tied head are
    left alone: merging into a tied head would change the embeddings too)."""
    return {n: m for n, m in model.named_modules()
            if n.startswith("blocks.") and hasattr(m, "weight") and getattr(m, "weight") is not None
            and getattr(m.weight, "dim", lambda: 0)() == 2 and not isinstance(m, LoRALinear)
            and not n.endswith(".base")}


def add_lora(model: nn.Module, rank: int, alpha: float = 16.0,
             targets: str | Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
             dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and wrap its target linear layers (matched by their last name, e.g.
    ``q_proj``; ``"all"`` for every linear layer in the blocks) in ``LoRALinear``. Returns the
    wrapped layers' names. Trainable parameters: ``R * (in + out)`` per wrapped layer."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora_rank={rank!r} is invalid: must be a positive integer")
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    candidates = _lora_candidates(model)
    available = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    chosen = {n: m for n, m in candidates.items()
              if names == ["all"] or n.rsplit(".", 1)[-1] in names}
    unknown = [t for t in names if t != "all" and t not in available]
    if unknown or not chosen:
        raise ConfigError(f"lora_targets={','.join(names)!r} is invalid: "
                          f"{', '.join(unknown) or 'nothing'} matches no linear layer in the "
                          f"blocks; available: {', '.join(available)} (or 'all')")
    not_linear = sorted({type(m).__name__ for m in chosen.values() if type(m) is not nn.Linear})
    if not_linear:
        raise ConfigError(f"lora_targets={','.join(names)!r}: LoRA wraps plain nn.Linear layers, "
                          f"these are {', '.join(not_linear)} (e.g. linear='bitlinear'); "
                          "fine-tune without LoRA (lora_rank=0)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen.items():
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, LoRALinear(module, rank, alpha, dropout))
    return sorted(chosen)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer and put the plain ``nn.Linear`` back; the model
    becomes an ordinary ``LM`` (every parameter trainable again). Returns how many merged."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in wrapped:
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return len(wrapped)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model underneath the adapters (DPO's reference, at no memory cost)."""
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in wrapped]
    for m in wrapped:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(wrapped, before):
            m.enabled = e


def count_trainable(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n
