"""BitLinear (BitNet b1.58): ternary weights {-1, 0, +1} and 8-bit activations.

Hand-written: no maintained library fits; the PyPI ``bitnet`` package has had no release since
April 2024, and none offers a b1.58 layer that trains on CPU and exports packed 2-bit weights.

Weights are scaled by their mean absolute value (absmean) and rounded to {-1, 0, +1}; the
activations entering the layer are RMS-normalised and rounded to 8 bits per row (absmax).
Training keeps full-precision latent weights and passes gradients straight through the
rounding (straight-through estimator), as in Ma et al. 2024 and Zhu et al. 2024.

Dimension letters: N rows (all leading dimensions), I in features, O out features,
P packed bytes (four weights each).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minlm.modules.norm import RMSNorm
from minlm.tracing import LoggingModule


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """``q`` in the forward pass, identity gradient to ``x`` in the backward pass.

    ``x - x.detach()`` is exactly zero, so the value is exactly ``q`` (not ``x + (q - x)``,
    which can be off by a rounding error).
    """
    return q.detach() + (x - x.detach())


def ternarize(w: torch.Tensor, eps: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, scale): t in {-1, 0, +1} (same dtype as w) and the absmean scale, w ~ t * scale."""
    scale = w.abs().mean().clamp(min=eps)
    return (w / scale).round().clamp(-1, 1), scale


def quantize_weight(w: torch.Tensor) -> torch.Tensor:
    t, scale = ternarize(w)
    return t * scale


def quantize_activations(x: torch.Tensor, bits: int = 8, eps: float = 1e-5) -> torch.Tensor:
    """Per-row absmax quantisation to ``bits`` bits (values stay in x's dtype, rescaled)."""
    q_max = 2 ** (bits - 1) - 1
    scale = q_max / x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
    return (x * scale).round().clamp(-q_max - 1, q_max) / scale


class _QuantizeActivationsSTE(torch.autograd.Function):
    """``quantize_activations`` forward, identity backward: ``ste(x, quantize_activations(x))``
    in one pass over x instead of four (the same values, computed in place)."""

    @staticmethod
    def forward(ctx, x, bits, eps):
        q_max = 2 ** (bits - 1) - 1
        scale = q_max / x.abs().amax(dim=-1, keepdim=True).clamp(min=eps)
        return (x * scale).round_().clamp_(-q_max - 1, q_max).div_(scale)

    @staticmethod
    def backward(ctx, grad):
        return grad, None, None


def quantize_activations_ste(x: torch.Tensor, bits: int = 8, eps: float = 1e-5) -> torch.Tensor:
    return _QuantizeActivationsSTE.apply(x, bits, eps)


class _WeightSTE(torch.autograd.Function):
    """``ste(w, q)`` for a precomputed ``q``: returns q itself, passes the gradient to w, where
    ``q.detach() + (w - w.detach())`` makes two more passes over the weight each way."""

    @staticmethod
    def forward(ctx, w, q):
        return q.view_as(q)  # a new tensor object: the cached q gets no autograd history

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def _cached(module: nn.Module, source: torch.Tensor, make):
    """``make()`` computed once per value of ``source``: recomputed when its storage, version
    counter (bumped by every in-place change: an optimizer step, ``load_state_dict``), dtype
    or device changes. Kept in the module's ``__dict__``, so it is never saved."""
    key = (source.data_ptr(), source._version, source.dtype, source.device)
    entry = module.__dict__.get("_cached_quantized")
    if entry is None or entry[0] != key:
        with torch.no_grad():
            entry = module.__dict__["_cached_quantized"] = (key, make())
    return entry[1]


def pack_ternary(t: torch.Tensor) -> torch.Tensor:
    """Four ternary values per byte: code = t + 1 in {0, 1, 2}, two bits each, low bits first."""
    codes = (t.reshape(-1) + 1).to(torch.uint8)
    pad = (-codes.numel()) % 4
    codes = F.pad(codes, (0, pad)).view(-1, 4)  # (P, 4)
    return codes[:, 0] | (codes[:, 1] << 2) | (codes[:, 2] << 4) | (codes[:, 3] << 6)


def unpack_ternary(packed: torch.Tensor, shape: tuple[int, ...],
                   dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Inverse of ``pack_ternary``: a tensor of ``shape`` with values in {-1, 0, +1}."""
    shifts = torch.tensor([0, 2, 4, 6], dtype=torch.uint8, device=packed.device)
    codes = (packed.unsqueeze(-1) >> shifts) & 3  # (P, 4)
    n = math.prod(shape)
    return (codes.reshape(-1)[:n].to(dtype) - 1).view(shape)  # (P*4,) -> shape, e.g. (O, I)


class BitLinear(LoggingModule):
    """A drop-in for ``nn.Linear``: RMSNorm -> 8-bit activations -> ternary weights.

    ``weight`` is the latent full-precision matrix the optimizer updates; the forward pass
    only ever multiplies by its ternary quantisation (``quantized_weight()``), computed once
    per value of the weight (once per optimizer step in training, once in all for decoding).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 eps: float = 1e-8):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.norm = RMSNorm(in_features, eps)
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None
        nn.init.normal_(self.weight, 0.0, 0.02)

    def quantized_weight(self) -> torch.Tensor:
        """The ternary weight times its scale, a constant (no gradient), cached until the
        weight changes."""
        return _cached(self, self.weight, lambda: quantize_weight(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = quantize_activations_ste(self.norm(x))
        w = _WeightSTE.apply(self.weight, self.quantized_weight())  # ste(weight, quantised)
        return F.linear(x, w, self.bias)

    def extra_flops(self, args, output) -> int:
        rows = args[0].numel() // self.in_features
        return 2 * rows * self.in_features * self.out_features

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class PackedBitLinear(LoggingModule):
    """Inference-only BitLinear that keeps its weights packed, 2 bits each, and unpacks per call.

    Gives exactly the logits of the ``BitLinear`` it was made from (same quantised values,
    same operations). Built by ``from_bitlinear`` or, empty, by ``minlm.ternary.load_packed_model``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False,
                 eps: float = 1e-8):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.norm = RMSNorm(in_features, eps)
        n_bytes = (in_features * out_features + 3) // 4
        self.register_buffer("packed", torch.zeros(n_bytes, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    @classmethod
    @torch.no_grad()
    def from_bitlinear(cls, m: BitLinear) -> PackedBitLinear:
        new = cls(m.in_features, m.out_features, m.bias is not None, m.norm.eps)
        t, scale = ternarize(m.weight.detach().float())
        new.packed.copy_(pack_ternary(t))
        new.scale.copy_(scale.reshape(1))
        new.norm.weight.copy_(m.norm.weight)
        if m.bias is not None:
            new.bias.copy_(m.bias)
        return new.to(m.weight.device)

    def weight(self, dtype: torch.dtype) -> torch.Tensor:
        """The unpacked weight in ``dtype``, cached until the packed bytes change (or dtype)."""
        shape = (self.out_features, self.in_features)
        entry = self.__dict__.get("_unpacked")
        key = (self.packed.data_ptr(), self.packed._version, self.scale._version, dtype)
        if entry is None or entry[0] != key:
            w = unpack_ternary(self.packed, shape, dtype) * self.scale.to(dtype)[0]
            entry = self.__dict__["_unpacked"] = (key, w)
        return entry[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.norm(x)
        x = quantize_activations(x)
        return F.linear(x, self.weight(x.dtype), self.bias)

    def extra_flops(self, args, output) -> int:
        rows = args[0].numel() // self.in_features
        return 2 * rows * self.in_features * self.out_features


LINEARS = {"linear": nn.Linear, "bitlinear": BitLinear}


def make_linear(cfg, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """The linear layer a config asks for (``cfg.linear``): ``nn.Linear`` or ``BitLinear``."""
    return LINEARS[cfg.linear](in_features, out_features, bias=bias)
