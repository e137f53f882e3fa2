"""Kolmogorov-Arnold layers (Liu et al. 2024): a learned B-spline function on every edge.

Hand-written: no maintained library fits; pykan is a research toolkit (symbolic fitting, grid
updates, plotting) rather than a drop-in for ``nn.Linear``, and the layer is ~40 lines.

``KANLinear`` replaces ``y = W x`` by ``y_o = sum_i w_oi * silu(x_i) + sum_i spline_oi(x_i)``,
each ``spline_oi`` a combination of B-spline bases of ``order`` on a uniform grid of
``grid_size`` intervals over [-2, 2] (inputs outside it get only the silu part). With
``activation="kan"`` the MLP's two linear layers are KANLinear and there is no fixed
activation between them: the splines are the nonlinearity. A KAN edge has
``1 + grid_size + order`` parameters instead of one, so pick a smaller ``hidden_mult``.

Dimension letters: N rows (all leading dimensions), I in features, O out features,
K bases per edge (grid_size + order), G grid points.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minlm.modules.registry import register_channel_mixer
from minlm.tracing import LoggingModule, Probe

GRID_RANGE = (-2.0, 2.0)  # inputs come from RMS-normalised activations, mostly within 2 sigma


class KANLinear(LoggingModule):
    def __init__(self, in_features: int, out_features: int, grid_size: int = 5, order: int = 3):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.grid_size, self.order = grid_size, order
        lo, hi = GRID_RANGE
        step = (hi - lo) / grid_size
        grid = lo + step * torch.arange(-order, grid_size + order + 1, dtype=torch.float32)
        self.register_buffer("grid", grid, persistent=False)  # (G,), G = grid_size + 2*order + 1
        self.base_weight = nn.Parameter(torch.empty(out_features, in_features))
        self.spline_weight = nn.Parameter(torch.empty(out_features, in_features, grid_size + order))
        nn.init.normal_(self.base_weight, 0.0, 1 / math.sqrt(in_features))
        nn.init.normal_(self.spline_weight, 0.0, 0.1 / math.sqrt(in_features))

    def b_splines(self, x: torch.Tensor) -> torch.Tensor:
        """B-spline bases of every input value by the Cox-de Boor recursion: (N, I) -> (N, I, K)."""
        g = self.grid.to(x.dtype)
        x = x.unsqueeze(-1)  # (N, I, 1)
        bases = ((x >= g[:-1]) & (x < g[1:])).to(x.dtype)  # (N, I, G-1): order 0
        for p in range(1, self.order + 1):
            left = (x - g[: -(p + 1)]) / (g[p:-1] - g[: -(p + 1)]) * bases[..., :-1]
            right = (g[p + 1:] - x) / (g[p + 1:] - g[1:-p]) * bases[..., 1:]
            bases = left + right  # (N, I, G-1-p)
        return bases

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        *lead, I = x.shape
        flat = x.reshape(-1, I)  # (N, I)
        base = F.linear(F.silu(flat), self.base_weight)  # (N, O)
        bases = self.b_splines(flat).reshape(flat.shape[0], -1)  # (N, I*K)
        spline = F.linear(bases, self.spline_weight.reshape(self.out_features, -1))  # (N, O)
        return (base + spline).reshape(*lead, self.out_features)  # (..., O)

    def extra_flops(self, args, output) -> int:
        rows = args[0].numel() // self.in_features
        K = self.grid_size + self.order
        edges = self.in_features * self.out_features
        return 2 * rows * edges * (1 + K) + 6 * rows * self.in_features * K * self.order

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"grid_size={self.grid_size}, order={self.order}")


def _flops(cfg, T: int = 0) -> float:
    """Per token, as ``KANLinear.extra_flops`` counts them for up (C -> F) and down (F -> C):
    2 per base and spline weight, plus the B-spline recursion over each input."""
    C, F_, K = cfg.dim, cfg.ffn_dim, cfg.kan_grid + cfg.kan_order
    return 2 * 2 * C * F_ * (1 + K) + 6 * (C + F_) * K * cfg.kan_order


def _saved_per_input(cfg) -> float:
    """Values a KANLinear saves for backward per input feature and token: the B-spline
    recursion keeps several tensors at each of its ``order`` levels. Fitted exactly to
    ``minlm.memory.saved_values_per_token`` over grid 2-5, order 1-3 (not derived)."""
    G, k = cfg.kan_grid, cfg.kan_order
    return (3 * k - 1) * G + 4.5 * k * k - 3.5 * k + 4


@register_channel_mixer("kan", config_fields=("kan_grid", "kan_order"), flops=_flops,
                        examples={"kan_grid": 3, "kan_order": 2}, requires={"hidden_dim": 32},
                        memory=lambda cfg, T: _saved_per_input(cfg) * (cfg.dim + cfg.ffn_dim))
class KANMLP(LoggingModule):
    """down(up(x)) with KANLinear layers: the channel mixer for ``activation="kan"``."""

    def __init__(self, cfg):
        super().__init__()
        C, F_ = cfg.dim, cfg.ffn_dim
        self.up = KANLinear(C, F_, cfg.kan_grid, cfg.kan_order)
        self.hidden = Probe()
        self.down = KANLinear(F_, C, cfg.kan_grid, cfg.kan_order)
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.down(self.hidden(self.up(x))))
