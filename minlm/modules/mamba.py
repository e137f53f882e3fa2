"""Mamba: a selective state-space token mixer (Gu & Dao 2023, "Mamba: Linear-Time Sequence
Modeling with Selective State Spaces", section 3), ``mixer="mamba"``, in pure PyTorch.

Hand-written: the reference package (mamba-ssm) needs CUDA kernels; this keeps the same
computation readable and CPU-friendly. Per channel e and state index n::

    x, z     = in_proj(u)                               two branches of width E = expand * C
    x        = silu(causal depthwise conv(x))           short local mixing (d_conv taps)
    dt, B, C = x_proj(x);  dt = softplus(dt_proj(dt))   input-dependent ("selective") step
    h_t      = exp(dt_t A) h_{t-1} + dt_t B_t x_t       A = -exp(A_log) < 0: a decay per (e, n)
    y_t      = C_t . h_t + D x_t
    out      = out_proj(y * silu(z))                    gated output

Training runs the selective scan in one of two forms (``mixer_options={"scan": ...}``):
``"chunked"`` (the default), ``minlm.modules.scan.selective_scan``: a hand-written forward
and backward over chunks of ``scan_chunk`` positions (0: as many as keep the chunk's states
cache-sized), the contractions with B and C as batched matrix products, or ``"reference"``,
the step-by-step loop that the formula above reads as, differentiated by autograd. The
registry-generated tests prove the two equal in values and gradients. The causal conv runs
the same way in two forms (``"conv"``): ``"shifts"`` (the default), one multiply-add per tap
on the time-major branch, or ``"reference"``, F.conv1d on the branch transposed to (B, E, T).
Decoding carries (the
last d_conv - 1 conv inputs, h) and costs O(1) per token.

Dimension letters: B batch, T time, C model width, E inner width, N state size, K conv taps,
R rank of the step projection.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from minlm.modules.fastpath import joint_linear
from minlm.modules.scan import selective_scan, selective_scan_reference
from minlm.modules.registry import TokenMixer, option, register_mixer
from minlm.tracing import Probe

# dt_rank 0: ceil(dim / 16); scan_chunk 0: chunks of scan.SCAN_ELEMENTS state values
OPTIONS = {"d_state": 16, "d_conv": 4, "expand": 2, "dt_rank": 0, "scan_chunk": 0,
           "scan": "chunked", "conv": "shifts"}
SELECTIVE_SCANS = {"chunked": selective_scan, "reference": selective_scan_reference}


def _sizes(cfg) -> tuple[int, int, int, int]:
    E = option(cfg, "mamba", "expand") * cfg.dim
    R = option(cfg, "mamba", "dt_rank") or math.ceil(cfg.dim / 16)
    return E, option(cfg, "mamba", "d_state"), option(cfg, "mamba", "d_conv"), R


def _validate(cfg) -> None:
    from minlm.errors import ConfigError

    for name in OPTIONS:
        if name in ("scan", "conv"):
            continue  # the registry checks the form's name
        value = option(cfg, "mamba", name)
        automatic = name in ("dt_rank", "scan_chunk")  # 0 picks the value
        if value < (0 if automatic else 1):
            raise ConfigError(f"mixer_options {name}={value} is invalid for mamba: must be "
                              f"{'>= 0 (0: automatic)' if automatic else '>= 1'}")


def _flops(cfg, T: int) -> float:
    """The depthwise convolution and the read-out y_t = C_t . h_t (a matrix product in the
    chunked scan); the projections count as weights, the state update is element-wise."""
    E, N, K, _ = _sizes(cfg)
    return 2 * E * K + 2 * E * N


def causal_depthwise_conv(x: torch.Tensor, conv: nn.Conv1d, prev: torch.Tensor | None):
    """Causal depthwise conv over time of x (B, E, T) after ``prev`` (B, E, K-1) earlier inputs
    (zeros at the start); returns the output (B, E, T) and the last K-1 inputs for next time."""
    K = conv.kernel_size[0]
    if prev is None:
        prev = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    padded = torch.cat([prev, x], dim=-1)  # (B, E, K-1+T)
    return F.conv1d(padded, conv.weight, conv.bias, groups=conv.groups), padded[:, :, padded.shape[-1] - (K - 1):]


def causal_conv_shifts(x: torch.Tensor, conv: nn.Conv1d, prev: torch.Tensor | None):
    """``causal_depthwise_conv`` time-major: x (B, T, E) -> (B, T, E), prev and the returned
    last inputs (B, E, K-1) as there. One multiply-add per tap on shifted views, so the branch
    stays (B, T, E) throughout; F.conv1d wants (B, E, T), and the transposes to and from it
    and its backward cost more than the K multiply-adds."""
    K, T = conv.kernel_size[0], x.shape[1]
    if prev is None:
        padded = F.pad(x, (0, 0, K - 1, 0))  # (B, K-1+T, E)
    else:
        padded = torch.cat([prev.transpose(1, 2), x], dim=1)
    w = conv.weight[:, 0]  # (E, K)
    y = torch.addcmul(conv.bias, padded[:, K - 1:], w[:, K - 1])
    for k in range(K - 1):
        y = torch.addcmul(y, padded[:, k:k + T], w[:, k])
    return y, padded[:, padded.shape[1] - (K - 1):].transpose(1, 2)


def conv_step(x: torch.Tensor, conv: nn.Conv1d, prev: torch.Tensor | None):
    """One token of ``causal_depthwise_conv``: x (B, E) -> (B, E), and the new K-1 inputs."""
    K = conv.kernel_size[0]
    if prev is None:
        prev = x.new_zeros(x.shape[0], x.shape[1], K - 1)
    window = torch.cat([prev, x.unsqueeze(-1)], dim=-1)  # (B, E, K)
    y = (window * conv.weight[:, 0]).sum(-1)  # (B, E)
    return (y if conv.bias is None else y + conv.bias), window[:, :, 1:]


@register_mixer("mamba", state="recurrent", options=OPTIONS, validate=_validate, flops=_flops,
                examples={"d_state": 4, "d_conv": 2, "expand": 1, "dt_rank": 3, "scan_chunk": 5,
                          "scan": "reference", "conv": "reference"},
                forms={"scan": tuple(SELECTIVE_SCANS), "conv": ("shifts", "reference")},
                # saved per token by the chunked scan: about 15 E-wide tensors (branches, conv,
                # step sizes, gates) and the state entering each chunk, E N per chunk (one
                # chunk at small sizes; chunks hold scan.SCAN_ELEMENTS states, batch included)
                memory=lambda cfg, T: 15 * _sizes(cfg)[0] + _sizes(cfg)[0] * _sizes(cfg)[1] / T)
class Mamba(TokenMixer):
    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__(cfg)
        C = cfg.dim
        E, N, K, R = _sizes(cfg)
        self.E, self.N, self.R = E, N, R
        self.scan_chunk = option(cfg, "mamba", "scan_chunk")
        self.scan = option(cfg, "mamba", "scan")
        self.conv_form = option(cfg, "mamba", "conv")
        self.in_proj = nn.Linear(C, 2 * E, bias=cfg.attn_bias)
        self.conv = nn.Conv1d(E, E, K, groups=E, bias=True)
        self.x_proj = nn.Linear(E, R + 2 * N, bias=False)
        self.dt_proj = nn.Linear(R, E, bias=True)
        self.A_log = nn.Parameter(torch.zeros(E, N))
        self.D = nn.Parameter(torch.ones(E))
        self.out_proj = nn.Linear(E, C, bias=cfg.attn_bias)
        # probe points: the inner steps a trace shows
        self.conv_out, self.step_size, self.states, self.gated = Probe(), Probe(), Probe(), Probe()
        self.reset_special_parameters()

    @torch.no_grad()
    def reset_special_parameters(self) -> None:
        """S4D-real A (decay rates 1..N), D = 1, step sizes log-uniform in [1e-3, 1e-1]
        through the inverse softplus of dt_proj's bias, as the paper initialises them, and the
        convolution's PyTorch default (the model's std 0.02 on 4 taps would mute the branch)."""
        self.conv.reset_parameters()
        self.A_log.copy_(torch.log(torch.arange(1, self.N + 1, dtype=torch.float32)).expand(self.E, -1))
        self.D.fill_(1.0)
        dt = torch.exp(torch.rand(self.E) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
        self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))

    def _selective(self, x: torch.Tensor):
        """Step sizes (..., E), B and C (..., N) from the convolved input x (..., E)."""
        dbc = self.x_proj(x)  # (..., R + 2N)
        dt, Bm, Cm = dbc.split([self.R, self.N, self.N], dim=-1)
        return F.softplus(self.dt_proj(dt)), Bm, Cm

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        E, N = self.E, self.N
        xi, z = self.in_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        valid = key_valid[:, -T:].unsqueeze(-1) if key_valid is not None else None  # (B, T, 1)
        if valid is not None:  # padding (before a row's first token) acts as the zero start
            xi = xi * valid.to(xi.dtype)
        conv_prev, h0 = cache.state if cache is not None and cache.state is not None else (None, None)
        if self.conv_form == "reference":
            xc, conv_next = causal_depthwise_conv(xi.transpose(1, 2), self.conv, conv_prev)
            xc = xc.transpose(1, 2)
        else:
            xc, conv_next = causal_conv_shifts(xi, self.conv, conv_prev)
        xc = self.conv_out(F.silu(xc))  # (B, T, E)
        dt, Bm, Cm = self._selective(xc)  # (B, T, E), (B, T, N), (B, T, N)
        dt = self.step_size(dt)
        A = -torch.exp(self.A_log)  # (E, N)
        u = dt * xc  # (B, T, E)
        if valid is not None:  # padding leaves the state alone: a = 1 (dt = 0), b = 0
            dt, u = dt * valid.to(dt.dtype), u * valid.to(u.dtype)
        if self.scan == "reference":
            y, h = selective_scan_reference(dt, A, u, Bm, Cm, h0)  # (B, T, E), (B, E, N)
        else:
            y, h = selective_scan(dt, A, u, Bm, Cm, h0, chunk=self.scan_chunk)
        h = self.states(h)  # (B, E, N): the state after the last token
        if cache is not None:
            cache.state = (conv_next, h)  # (B, E, K-1), (B, E, N)
        y = y + self.D * xc  # (B, T, E)
        return self.out_proj(self.gated(y * F.silu(z)))

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache,
             residual: torch.Tensor | None = None,
             gain: torch.Tensor | None = None) -> torch.Tensor:
        """One token per row, x (B, C): the recurrence's single step, O(1) in the context."""
        conv_prev, h = cache.state if cache.state is not None else (None, None)
        xi, z = joint_linear(self, ("in_proj",), x, gain=gain).chunk(2, dim=-1)  # (B, E) each
        xc, conv_next = conv_step(xi, self.conv, conv_prev)
        xc = F.silu(xc)
        dt, Bm, Cm = self._selective(xc)  # (B, E), (B, N), (B, N)
        a = torch.exp(dt.unsqueeze(-1) * -torch.exp(self.A_log))  # (B, E, N)
        b = (dt * xc).unsqueeze(-1) * Bm.unsqueeze(1)  # (B, E, N)
        h = b if h is None else a * h + b
        cache.state = (conv_next, h)
        y = (h * Cm.unsqueeze(1)).sum(-1) + self.D * xc  # (B, E)
        return joint_linear(self, ("out_proj",), y * F.silu(z), residual)
