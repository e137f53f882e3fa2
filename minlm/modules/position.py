"""Position information: RoPE and ALiBi act inside attention, learned positions on the input.
Each scheme is registered (``register_position``) for ``ModelConfig.position``; attention and
the model build their parts with ``registry.make_position``.

Dimension letters: B batch, H heads, T time (query positions), S key positions, D head size.
"""

from __future__ import annotations

import math
import sys

import torch
from torch import nn

import minlm.fast as fast
from minlm.modules.registry import register_position
from minlm.tracing import LoggingModule


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last axis: each pair
    (x[i], x[i + D/2]) turned by 90 degrees."""
    x1, x2 = x.chunk(2, dim=-1)  # (..., D/2) each
    return torch.cat((-x2, x1), dim=-1)


class RoPE(LoggingModule):
    """Rotary position embedding, half-split layout (as Hugging Face Llama uses): each pair
    (x[i], x[i + D/2]) rotated by the angle position * theta^(-2i/D).

    The cos/sin tables are non-persistent buffers: they are not saved with the weights and are
    rebuilt (longer) on the fly if a sequence runs past ``max_len``. With ``minlm.fast`` on,
    ``tables`` hands out the sine with rotate_half's sign folded in and ``rotate`` runs
    ``fast.rope_rotate`` (the same rotation).
    """

    def __init__(self, head_dim: int, max_len: int, theta: float = 10000.0):
        super().__init__()
        self.head_dim, self.theta = head_dim, theta
        self._build(max_len)

    def _build(self, length: int, device=None) -> None:
        inv_freq = 1.0 / (self.theta ** (torch.arange(0, self.head_dim, 2, device=device,
                                                      dtype=torch.float32) / self.head_dim))
        t = torch.arange(length, device=device, dtype=torch.float32)
        freqs = torch.outer(t, inv_freq)  # (T, D/2)
        angles = torch.cat((freqs, freqs), dim=-1)  # (T, D): pair i and i + D/2 share an angle
        self.register_buffer("cos", angles.cos(), persistent=False)
        self.register_buffer("sin", angles.sin(), persistent=False)
        self.register_buffer("signed_sin", fast.signed_sin(self.sin), persistent=False)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); positions: (T,) or (B, T) absolute positions."""
        return self.rotate(x, self.tables(positions, x.dtype))

    @staticmethod
    def rotate(x: torch.Tensor, tables: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """x rotated by ``tables`` from ``tables()`` (taken under the same switch setting)."""
        cos, sin = tables
        if fast.enabled():
            return fast.rope_rotate(x, cos, sin)  # sin here is the signed table
        return x * cos + rotate_half(x) * sin

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and sin at ``positions``: (T, D), or (B, 1, T, D) for per-row positions (the
        sine signed for ``fast.rope_rotate`` while ``minlm.fast`` is on)."""
        if positions.dim() == 1 and positions.shape[0] == 1 and dtype == self.cos.dtype \
                and not torch.compiler.is_compiling():  # one decoding step: views, no gather
            p = int(positions)
            if 0 <= p < self.cos.shape[0]:
                return self.cos[p:p + 1], self._sin_table()[p:p + 1]  # (1, D) each
        if not torch.compiler.is_compiling():  # reading positions.max() would break the graph;
            # compiled training stays within block_size, which the table always covers
            need = int(positions.max()) + 1 if positions.numel() else 0
            if need > self.cos.shape[0]:
                self._build(max(need, 2 * self.cos.shape[0]), device=self.cos.device)
        cos = self.cos[positions].to(dtype)  # (T, D) or (B, T, D)
        sin = self._sin_table()[positions].to(dtype)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        return cos, sin

    def _sin_table(self) -> torch.Tensor:
        return self.signed_sin if fast.enabled() else self.sin


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """Per-head slopes from the ALiBi paper: a geometric sequence starting at 2^(-8/n)."""

    def power_of_two(n: int) -> list[float]:
        start = 2 ** (-8 / n)
        return [start ** (i + 1) for i in range(n)]

    if math.log2(n_heads).is_integer():
        slopes = power_of_two(n_heads)
    else:  # the paper's recipe for other head counts: interleave from the next power of two
        closest = 2 ** math.floor(math.log2(n_heads))
        slopes = power_of_two(closest) + power_of_two(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32)


class ALiBi(LoggingModule):
    """Adds -slope * distance to attention scores; no table, so it extrapolates past training."""

    def __init__(self, n_heads: int):
        super().__init__()
        self.register_buffer("slopes", alibi_slopes(n_heads), persistent=False)

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """Bias of shape (H, T, S) (or (B, H, T, S) for per-row positions)."""
        dist = (q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)).float()  # (T, S) or (B, T, S)
        bias = -dist.clamp(min=0)
        slopes = self.slopes.view(-1, 1, 1)
        return slopes * (bias if bias.dim() == 2 else bias.unsqueeze(1))


class LearnedPositions(LoggingModule):
    """GPT-2's table of absolute position vectors, added to the token embeddings."""

    def __init__(self, max_len: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(max_len, dim))
        self.max_len = max_len

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        if (not torch.compiler.is_compiling()  # as in RoPE: no data-dependent check when compiled
                and positions.numel() and int(positions.max()) >= self.max_len):
            raise ValueError(
                f"position {int(positions.max())} is past the learned table of {self.max_len} "
                "positions (block_size); learned positions cannot extrapolate"
            )
        return x + self.weight[positions]


register_position("rope", source=RoPE, config_fields=("rope_theta",),
                  examples={"rope_theta": 500.0},
                  rotary=lambda cfg, head_dim: RoPE(head_dim, cfg.block_size, cfg.rope_theta))
register_position("alibi", source=ALiBi, bias=lambda cfg, n_heads: ALiBi(n_heads))
register_position("learned", source=LearnedPositions,
                  input=lambda cfg: LearnedPositions(cfg.block_size, cfg.dim),
                  memory=lambda cfg, T: 0)  # an addition keeps nothing for backward
# no position information: the order is the mixers' own (a recurrence), or absent
register_position("none", source=sys.modules[__name__])
