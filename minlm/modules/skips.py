"""U-net skips (modded-nanogpt): the output of each block of the first half is added, with a
learned weight, to the input of its mirror in the second half (block 0 feeds the last block,
block 1 the one before it, ...), so late layers see early features directly.

``LM`` keeps the skipped tensors on a stack while it runs the blocks; each ``SkipAdd`` is one
weighted add (weight starting at 1), a module so that a trace shows where the skips enter.
"""

from __future__ import annotations

import torch
from torch import nn

from minlm.tracing import LoggingModule


class SkipAdd(LoggingModule):
    """``x + w * skip`` with one learned scalar ``w``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return x + self.weight * skip


def unet_skips(n_layers: int, enabled: bool) -> nn.ModuleList:
    """One ``SkipAdd`` per mirrored pair (``n_layers // 2``; the middle of an odd stack has
    none), or an empty list when off."""
    return nn.ModuleList(SkipAdd() for _ in range(n_layers // 2 if enabled else 0))
