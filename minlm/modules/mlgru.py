"""MLGRU: the MatMul-free linear GRU token mixer (Zhu et al. 2024, "Scalable MatMul-free
Language Modeling", section 3.3), used in place of attention with ``mixer="mlgru"``.

Hand-written: the reference code (ridger/matmulfreellm) needs Triton kernels and a GPU; no
maintained CPU-friendly library provides this mixer.

    f_t = sigmoid(x_t W_f)                 forget gate
    c_t = silu(x_t W_c)                    candidate (cand_proj)
    h_t = f_t * h_{t-1} + (1 - f_t) * c_t  element-wise recurrence, no matrix on h
    g_t = sigmoid(x_t W_g)                 output gate
    o_t = (g_t * h_t) W_o

With ``linear="bitlinear"`` the four projections are ternary BitLinear layers, which is what
makes the model free of floating-point matrix multiplications. The recurrence over the whole
sequence runs in the form ``mixer_options={"scan": ...}`` names (``minlm.modules.scan``):
``"fused"`` (default; the loop with a hand-written backward), ``"parallel"`` (a log-depth
scan) or ``"reference"`` (the plain loop); incremental decoding carries h.

Dimension letters: B batch, T time, C model width.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from minlm.modules.bitlinear import make_linear
from minlm.modules.fastpath import joint_linear
from minlm.modules.registry import TokenMixer, option, register_mixer
from minlm.modules.scan import LINEAR_SCANS, linear_scan  # noqa: F401 - linear_scan: re-export
from minlm.tracing import Probe


# flops: none beyond the four projections (gates and scan are element-wise, uncounted by MFU)
@register_mixer("mlgru", state="recurrent", options={"scan": "fused"},
                examples={"scan": "reference"}, forms={"scan": tuple(LINEAR_SCANS)},
                # saved per token by the default (fused) scan: gates, inputs, decays and states
                memory=lambda cfg, T: 9 * cfg.dim)
class MLGRU(TokenMixer):
    """Token mixer with a recurrent state instead of a KV cache.

    Incremental decoding: ``cache`` is the per-layer object that ``LM.forward`` passes in
    (``cache.layer(i)``). The MLGRU reads ``cache.state`` (absent or None at first: a zero
    state) and writes back ``cache.state``, a (B, C) tensor holding h after the last token.
    ``key_valid`` (B, S) marks real tokens; its last T columns are this call's tokens, and a
    padding token leaves the state unchanged (forget gate 1, input 0). ``positions`` is
    accepted for the common mixer interface and not used: the recurrence knows the order.
    """

    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__(cfg)
        C = cfg.dim
        self.layer_idx = layer_idx
        self.scan = LINEAR_SCANS[option(cfg, "mlgru", "scan")]
        self.f_proj = make_linear(cfg, C, C, bias=cfg.attn_bias)
        self.cand_proj = make_linear(cfg, C, C, bias=cfg.attn_bias)
        self.g_proj = make_linear(cfg, C, C, bias=cfg.attn_bias)
        self.o_proj = make_linear(cfg, C, C, bias=cfg.attn_bias)
        # probe points: the gates and the hidden states, for traces
        self.forget, self.candidate, self.hidden = Probe(), Probe(), Probe()

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        f = self.forget(torch.sigmoid(self.f_proj(x)))  # (B, T, C)
        c = self.candidate(F.silu(self.cand_proj(x)))  # (B, T, C)
        a, b = f, (1 - f) * c
        if key_valid is not None:  # padding keeps the state: a = 1, b = 0
            valid = key_valid[:, -T:].unsqueeze(-1)  # (B, T, 1)
            a = torch.where(valid, a, torch.ones_like(a))
            b = b * valid.to(b.dtype)
        h0 = getattr(cache, "state", None) if cache is not None else None
        h = self.hidden(self.scan(a, b, h0))  # (B, T, C)
        if cache is not None:
            cache.state = h[:, -1]  # (B, C)
        g = torch.sigmoid(self.g_proj(x))  # (B, T, C)
        return self.o_proj(g * h)

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache,
             residual: torch.Tensor | None = None,
             gain: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row, x (B, C): the recurrence's single step h = f h + (1 - f) c."""
        C = x.shape[-1]
        fcg = joint_linear(self, ("f_proj", "cand_proj", "g_proj"), x, gain=gain)  # (B, 3C)
        f, c, g = torch.sigmoid(fcg[:, :C]), F.silu(fcg[:, C:2 * C]), torch.sigmoid(fcg[:, 2 * C:])
        h = (1 - f) * c if cache.state is None else torch.addcmul((1 - f) * c, f, cache.state)
        cache.state = h  # (B, C)
        return joint_linear(self, ("o_proj",), g * h, residual)
