"""Channel mixers: plain and gated MLPs, chosen by ``ModelConfig.activation``.

Dimension letters: B batch, T time, C model width, F hidden width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from minlm.modules.bitlinear import make_linear
from minlm.modules.fastpath import joint_linear
from minlm.modules.registry import register_channel_mixer
from minlm.tracing import LoggingModule, Probe


def relu2(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x).square()


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")  # GPT-2's GELU


ACTIVATIONS = {"gelu": gelu_tanh, "relu": F.relu, "silu": F.silu, "relu2": relu2,
               "swiglu": F.silu, "geglu": gelu_tanh}
GATED = {"swiglu", "geglu"}


def mlp_flops(cfg, T: int = 0) -> float:
    """Forward FLOPs per token: 2 per weight of up and down (and gate, for a gated MLP)."""
    return 2 * cfg.dim * cfg.ffn_dim * (3 if cfg.activation in GATED else 2)


def mlp_memory(cfg) -> float:
    """Values per token saved for backward: the input, and per hidden unit the activation's
    input and output (gated: also up's output and the product)."""
    return cfg.dim + cfg.ffn_dim * (4 if cfg.activation in GATED else 2)


@register_channel_mixer("mlp", config_fields=("activation", "mlp_bias"),
                        examples={"activation": "gelu", "mlp_bias": True}, flops=mlp_flops,
                        memory=lambda cfg, T: mlp_memory(cfg))
class MLP(LoggingModule):
    """down(act(up(x))), or down(act(gate(x)) * up(x)) for the gated variants."""

    def __init__(self, cfg):
        super().__init__()
        C, F_ = cfg.dim, cfg.ffn_dim
        self.act = ACTIVATIONS[cfg.activation]
        self.gated = cfg.activation in GATED
        self.gate = make_linear(cfg, C, F_, bias=cfg.mlp_bias) if self.gated else None
        self.up = make_linear(cfg, C, F_, bias=cfg.mlp_bias)
        self.down = make_linear(cfg, F_, C, bias=cfg.mlp_bias)
        self.hidden = Probe()
        self.drop = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gated:
            h = self.act(self.gate(x)) * self.up(x)  # (B, T, F)
        else:
            h = self.act(self.up(x))  # (B, T, F)
        return self.drop(self.down(self.hidden(h)))

    def step(self, x: torch.Tensor, residual: torch.Tensor | None = None,
             gain: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row, x (B, C), in eval mode: gate and up as one joined product (with
        ``gain`` (C,), if given, folded in: a preceding RMSNorm's weight); plus ``residual``
        if given, in the same product as ``down``."""
        if self.gated:
            g, u = joint_linear(self, ("gate", "up"), x, gain=gain).chunk(2, dim=-1)  # (B, F)
            h = self.act(g) * u
        else:
            h = self.act(joint_linear(self, ("up",), x, gain=gain))  # (B, F)
        return joint_linear(self, ("down",), h, residual)
