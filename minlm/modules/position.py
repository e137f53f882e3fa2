"""Position information: RoPE and ALiBi act inside attention, learned positions on the input.

Dimension letters: B batch, H heads, T time (query positions), S key positions, D head size.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from minlm.tracing import LoggingModule


def rotate_half_split(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, as ``x * cos + roll(x) * signed_sin`` in two kernels.

    ``signed_sin`` carries rotate_half's minus sign (its first half is -sin), so the rotation is
    a plain roll by half the head and the whole product one ``addcmul``; the textbook form
    (negate, concatenate, multiply, multiply, add) took ~1.6x as long forward+backward
    (1.7 vs 2.6 ms per call at 16x4x256x32 on a 2-core CPU).
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class RoPE(LoggingModule):
    """Rotary position embedding, half-split layout (as Hugging Face Llama uses).

    cos/signed_sin tables are non-persistent buffers: they are not saved with the weights and
    are rebuilt (longer) on the fly if a sequence runs past ``max_len``.
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
        self.register_buffer("cos", torch.cat((freqs.cos(), freqs.cos()), dim=-1), persistent=False)
        self.register_buffer("signed_sin", torch.cat((-freqs.sin(), freqs.sin()), dim=-1),
                             persistent=False)  # (T, D)

    def forward(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x: (B, H, T, D); positions: (T,) or (B, T) absolute positions."""
        return rotate_half_split(x, *self.tables(positions, x.dtype))

    def tables(self, positions: torch.Tensor, dtype: torch.dtype):
        """cos and signed sin at ``positions``: (T, D), or (B, 1, T, D) for per-row positions."""
        if positions.dim() == 1 and positions.shape[0] == 1 and dtype == self.cos.dtype \
                and not torch.compiler.is_compiling():  # one decoding step: views, no gather
            p = int(positions)
            if 0 <= p < self.cos.shape[0]:
                return self.cos[p:p + 1], self.signed_sin[p:p + 1]  # (1, D) each
        if not torch.compiler.is_compiling():  # reading positions.max() would break the graph;
            # compiled training stays within block_size, which the table always covers
            need = int(positions.max()) + 1 if positions.numel() else 0
            if need > self.cos.shape[0]:
                self._build(max(need, 2 * self.cos.shape[0]), device=self.cos.device)
        cos = self.cos[positions].to(dtype)  # (T, D) or (B, T, D)
        sin = self.signed_sin[positions].to(dtype)
        if cos.dim() == 3:
            cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)  # (B, 1, T, D)
        return cos, sin


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
