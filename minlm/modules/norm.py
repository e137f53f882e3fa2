"""Normalisation layers, registered by name (``@register_norm``) for ``ModelConfig.norm``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import minlm.fast as fast
from minlm.modules.registry import make_norm, register_norm  # noqa: F401 - make_norm re-exported
from minlm.tracing import LoggingModule


@register_norm("rmsnorm", config_fields=("norm_affine",), examples={"norm_affine": False},
               memory=lambda cfg, T: cfg.dim + 1)  # the input and 1/rms
class RMSNorm(LoggingModule):
    """Root-mean-square norm, computed in fp32 as Llama does, then cast back:
    ``x / sqrt(mean(x^2) + eps) * weight``. With ``minlm.fast`` on, fp32 calls with a gain
    run ``fast.rms_norm`` (the same values, a hand-written backward)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = False):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fast.enabled() and fast.rms_norm_applies(x, self.weight):
            return fast.rms_norm(x, self.weight, self.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)  # (..., C)
        h = h.to(x.dtype)
        return h * self.weight if self.weight is not None else h

    def step(self, x: torch.Tensor) -> torch.Tensor:
        """Decoding: the forward's formula (the same values) with its temporaries reused in
        place, since one token per row spends its time in per-op overhead."""
        weight = self._parameters.get("weight")  # not self.weight (its lookup costs); None: no gain
        if weight is not None and weight.dtype == x.dtype == torch.float32:
            inv_rms = x.square().sum(-1, keepdim=True).div_(x.shape[-1]).add_(self.eps).rsqrt_()
            return x.mul(inv_rms).mul_(weight)  # (B, C)
        return self.forward(x)

    def split_step(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Decoding: ``step(x)`` as (x / rms(x), gain) for the next product to fold the gain
        into its weights (``fastpath.joint_linear``); (``step(x)``, None) where it cannot."""
        weight = self._parameters.get("weight")
        if weight is not None and weight.dtype == x.dtype == torch.float32:
            return x * x.square().mean(-1, keepdim=True).add_(self.eps).rsqrt_(), weight
        return self.step(x), None


@register_norm("layernorm", config_fields=("norm_affine", "norm_bias"),
               examples={"norm_affine": False, "norm_bias": True},
               memory=lambda cfg, T: cfg.dim + 2)  # the input, mean and 1/std
class LayerNorm(LoggingModule):
    """LayerNorm with optional bias (GPT-2 has one, many newer models drop it)."""

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None
        self.bias = nn.Parameter(torch.zeros(dim)) if affine and bias else None
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (self.dim,), self.weight, self.bias, self.eps)

    step = forward  # decoding: already one fused call


@register_norm("cosinenorm", config_fields=("norm_affine",), examples={"norm_affine": False},
               # the input, its norm and the clamped norm; the unit vector when a gain follows
               memory=lambda cfg, T: cfg.dim + 2 + (cfg.dim if cfg.norm_affine else 0))
class CosineNorm(LoggingModule):
    """Projects each vector onto the sphere of radius sqrt(dim), then an optional learned gain.

    Unlike RMSNorm it has no epsilon inside the root, so the output norm is exact.
    """

    def __init__(self, dim: int, eps: float = 1e-5, affine: bool = True, bias: bool = False):
        super().__init__()
        self.scale = dim ** 0.5
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.normalize(x.float(), dim=-1, eps=self.eps).to(x.dtype) * self.scale
        return h * self.weight if self.weight is not None else h

    step = forward


def split_step(norm: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One token of ``norm`` as (output without the gain, gain to fold into the next product)
    where the norm can split so (an fp32 RMSNorm), else (its whole output, None)."""
    split = getattr(norm, "split_step", None)
    return split(x) if split is not None else (norm.step(x), None)
