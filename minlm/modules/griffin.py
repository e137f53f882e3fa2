"""Griffin's recurrent block (De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with
Local Attention for Efficient Language Models", section 2.4), ``mixer="griffin"``.

Hand-written: no maintained CPU library ships the RG-LRU. Two branches of width E::

    y = gelu(W_y u)                                      the gate branch
    x = causal depthwise conv(W_x u)                     temporal convolution (d_conv taps)
    r_t = sigmoid(W_a x_t + b_a)                         recurrence gate
    i_t = sigmoid(W_i x_t + b_i)                         input gate
    a_t = sigma(L)^(c r_t)          (c = 8)              real, input-dependent decay in (0, 1)
    h_t = a_t h_{t-1} + sqrt(1 - a_t^2) (i_t x_t)        the Real-Gated Linear Recurrent Unit
    out = W_o (y * h)

The paper's gates are block-diagonal per head; here they are full E x E matrices (fewer
parameters saved, simpler code). Alone this is the Hawk model; the ``hybrid-1m`` preset
interleaves it with sliding-window attention through the per-layer ``block_spec`` list, as
Griffin does. Training scans in the form ``mixer_options={"scan": ...}`` names, as the
MLGRU (``minlm.modules.scan``: ``"fused"``, ``"parallel"`` or ``"reference"``); decoding
carries (the last d_conv - 1 conv inputs, h).

Dimension letters: B batch, T time, C model width, E recurrence width.
"""

from __future__ import annotations


import torch
import torch.nn.functional as F
from torch import nn

from minlm.modules.fastpath import joint_linear
from minlm.modules.mamba import causal_depthwise_conv, conv_step
from minlm.modules.scan import LINEAR_SCANS
from minlm.modules.registry import TokenMixer, option, register_mixer
from minlm.tracing import Probe

OPTIONS = {"d_conv": 4, "width": 0, "scan": "fused"}  # width 0: the model width
C_EXPONENT = 8.0  # the paper's c


def _sizes(cfg) -> tuple[int, int]:
    return option(cfg, "griffin", "width") or cfg.dim, option(cfg, "griffin", "d_conv")


def _validate(cfg) -> None:
    from minlm.errors import ConfigError

    if option(cfg, "griffin", "d_conv") < 1 or option(cfg, "griffin", "width") < 0:
        raise ConfigError(f"mixer_options {cfg.mixer_options} are invalid for griffin: d_conv "
                          "must be >= 1 and width >= 0 (0: the model width)")


@register_mixer("griffin", state="recurrent", options=OPTIONS, validate=_validate,
                flops=lambda cfg, T: 2 * _sizes(cfg)[0] * _sizes(cfg)[1],  # the depthwise conv
                examples={"d_conv": 2, "width": 24, "scan": "reference"},
                forms={"scan": tuple(LINEAR_SCANS)},
                # saved per token by the default (fused) scan: about 18 E-wide tensors
                memory=lambda cfg, T: 18 * _sizes(cfg)[0])
class Griffin(TokenMixer):
    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__(cfg)
        C = cfg.dim
        E, K = _sizes(cfg)
        self.y_proj = nn.Linear(C, E, bias=cfg.attn_bias)
        self.x_proj = nn.Linear(C, E, bias=cfg.attn_bias)
        self.conv = nn.Conv1d(E, E, K, groups=E, bias=True)
        self.a_gate = nn.Linear(E, E, bias=True)
        self.i_gate = nn.Linear(E, E, bias=True)
        self.decay = nn.Parameter(torch.zeros(E))  # L: sigma(L)^c is the slowest decay
        self.o_proj = nn.Linear(E, C, bias=cfg.attn_bias)
        self.conv_out, self.recurrence_gate, self.states = Probe(), Probe(), Probe()
        self.scan = LINEAR_SCANS[option(cfg, "griffin", "scan")]
        self.reset_special_parameters()

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        """sigma(L)^c uniform in [0.9, 0.999], as the paper initialises the decay; the
        convolution keeps PyTorch's default (std 0.02 on 4 taps would mute the branch)."""
        self.conv.reset_parameters()
        a = torch.empty_like(self.decay).uniform_(0.9 ** 2, 0.999 ** 2).sqrt()  # a^c targets
        self.decay.copy_(torch.logit(a ** (1 / C_EXPONENT)))

    def _gates(self, x: torch.Tensor):
        """Decay a and input scale sqrt(1 - a^2) * i for the convolved input x (..., E)."""
        r = self.recurrence_gate(torch.sigmoid(self.a_gate(x)))
        log_a = C_EXPONENT * r * F.logsigmoid(self.decay)  # (..., E): log a_t <= 0
        a = torch.exp(log_a)
        scale = torch.sqrt((-torch.expm1(2 * log_a)).clamp(min=0))  # sqrt(1 - a^2), exact near 1
        return a, scale * torch.sigmoid(self.i_gate(x))

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        T = x.shape[1]
        y = F.gelu(self.y_proj(x))  # (B, T, E)
        xi = self.x_proj(x)  # (B, T, E)
        valid = key_valid[:, -T:].unsqueeze(-1) if key_valid is not None else None  # (B, T, 1)
        if valid is not None:  # padding before a row's first token acts as the zero start
            xi = xi * valid.to(xi.dtype)
        conv_prev, h0 = cache.state if cache is not None and cache.state is not None else (None, None)
        xc, conv_next = causal_depthwise_conv(xi.transpose(1, 2), self.conv, conv_prev)
        xc = self.conv_out(xc.transpose(1, 2))  # (B, T, E)
        a, scale = self._gates(xc)
        b = scale * xc
        if valid is not None:  # padding leaves the state alone
            a = torch.where(valid, a, torch.ones_like(a))
            b = b * valid.to(b.dtype)
        h = self.states(self.scan(a, b, h0))  # (B, T, E)
        if cache is not None:
            cache.state = (conv_next, h[:, -1])
        return self.o_proj(y * h)

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache,
             residual: torch.Tensor | None = None,
             gain: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row, x (B, C) -> (B, C), O(1) in the context."""
        conv_prev, h = cache.state if cache.state is not None else (None, None)
        E = self.decay.shape[0]
        yx = joint_linear(self, ("y_proj", "x_proj"), x, gain=gain)  # (B, 2E)
        xc, conv_next = conv_step(yx[:, E:], self.conv, conv_prev)
        a, scale = self._gates(xc)
        h = scale * xc if h is None else a * h + scale * xc  # (B, E)
        cache.state = (conv_next, h)
        return joint_linear(self, ("o_proj",), F.gelu(yx[:, :E]) * h, residual)
