"""Differential attention: the difference of two softmax attention maps cancels the attention
"noise" both share (Ye et al. 2024, section 2.1)::

    A = softmax(Q1 K1^T / sqrt(d)) - lambda softmax(Q2 K2^T / sqrt(d))
    y = (1 - lambda_init) * RMSNorm_per_head(A V)
    lambda = exp(lq1 . lk1) - exp(lq2 . lk2) + lambda_init
    lambda_init = 0.8 - 0.6 exp(-0.3 (l - 1))      for layer l = 1, 2, ...

Each of the H heads (``n_heads``) has two query/key halves of size d = head_size / 2 and one
value of size head_size, so the parameters match standard attention. By default
(``mixer_options={"diff_kernel": "sdpa"}``) the two maps are never materialised: since
A V = softmax(Q1 K1^T) V - lambda softmax(Q2 K2^T) V, one fused
``scaled_dot_product_attention`` call over the 2H half-heads (each value shared by its two)
gives both terms. ``"reference"`` computes the maps explicitly as written above (and a trace
always does, to show them); the generated tests prove the two equal. Decoding keeps keys and
values in the ``KVCache`` (keys as 2H half-heads) and uses the default ``TokenMixer.step``
(forward on the one new token): nothing else to write for cached generation to be right.

Dimension letters: B batch, T queries, S keys, C model width, H heads, D head size, d = D/2.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import minlm.tracing as tracing

from minlm.modules.attention import attention_mask
from minlm.modules.norm import RMSNorm
from minlm.modules.position import RoPE
from minlm.modules.registry import TokenMixer, option, register_mixer
from minlm.tracing import Identity, Probe


def _validate(cfg) -> None:
    from minlm.errors import ConfigError

    if cfg.head_size % 4:
        raise ConfigError(f"head_dim={cfg.head_size} is invalid for diffattn: each head splits "
                          "into two RoPE-rotated halves, so it must be a multiple of 4")
    if cfg.position not in ("rope", "none", "learned"):
        raise ConfigError(f"position={cfg.position!r} is invalid for diffattn: use 'rope', "
                          "'learned' or 'none'")


@register_mixer("diffattn", state="kv", positional=True, validate=_validate,
                options={"diff_lambda_init": 0.0,  # 0: the paper's depth schedule
                         "diff_kernel": "sdpa"},
                examples={"diff_lambda_init": 0.5, "diff_kernel": "reference"},
                forms={"diff_kernel": ("sdpa", "reference")},
                # 2 maps of size d, and A V for each of them (the fused kernel's way; the
                # reference takes one A V of the difference, 4 H D T)
                flops=lambda cfg, T: 6 * cfg.n_heads * cfg.head_size * T,
                # saved per token: input, q/k/v and outputs (5 H D), both maps and their difference
                memory=lambda cfg, T: cfg.dim + 5 * cfg.n_heads * cfg.head_size
                + 3 * cfg.n_heads * T)
class DiffAttention(TokenMixer):
    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__(cfg)
        C, H, D = cfg.dim, cfg.n_heads, cfg.head_size
        self.n_heads, self.head_dim = H, D
        self.q_proj = nn.Linear(C, H * D, bias=cfg.attn_bias)  # two halves of d per head
        self.k_proj = nn.Linear(C, H * D, bias=cfg.attn_bias)
        self.v_proj = nn.Linear(C, H * D, bias=cfg.attn_bias)
        self.o_proj = nn.Linear(H * D, C, bias=cfg.attn_bias)
        self.rope = RoPE(D // 2, cfg.block_size, cfg.rope_theta) if cfg.position == "rope" \
            else Identity()
        self.lambda_init = option(cfg, "diffattn", "diff_lambda_init") or \
            0.8 - 0.6 * math.exp(-0.3 * layer_idx)
        self.lambdas = nn.ParameterList(nn.Parameter(torch.zeros(D // 2)) for _ in range(4))
        self.head_norm = RMSNorm(D, cfg.norm_eps)
        self.kernel = option(cfg, "diffattn", "diff_kernel")
        self.probs1, self.probs2, self.diff = Probe(), Probe(), Probe()

    def reset_special_parameters(self) -> None:
        with torch.no_grad():
            for p in self.lambdas:
                p.normal_(0.0, 0.1)

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, key_valid: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        H, D = self.n_heads, self.head_dim
        if positions is None:
            positions = torch.arange(T, device=x.device)
        q = self.q_proj(x).view(B, T, 2 * H, D // 2).transpose(1, 2)  # (B, 2H, T, d)
        k = self.k_proj(x).view(B, T, 2 * H, D // 2).transpose(1, 2)  # (B, 2H, T, d)
        v = self.v_proj(x).view(B, T, H, D).transpose(1, 2)  # (B, H, T, D)
        q, k = self.rope(q, positions), self.rope(k, positions)
        k_pos = positions
        if cache is not None:
            k, v, k_pos, key_valid = cache.update(k, v, positions, key_valid)
        lq1, lk1, lq2, lk2 = self.lambdas
        lam = torch.exp((lq1 * lk1).sum()) - torch.exp((lq2 * lk2).sum()) + self.lambda_init
        if self.kernel == "sdpa" and not tracing.enabled():
            y = self._fused(q, k, v, lam, positions, k_pos, key_valid)  # (B, H, T, D)
        else:
            allowed = attention_mask(positions, k_pos, 0, key_valid)  # (T, S) or (B, 1, T, S)
            scores = (q @ k.transpose(-2, -1)) * (D // 2) ** -0.5  # (B, 2H, T, S)
            probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1)
            p1, p2 = self.probs1(probs[:, 0::2]), self.probs2(probs[:, 1::2])  # (B, H, T, S)
            y = self.diff(p1 - lam * p2) @ v  # (B, H, T, D)
        y = self.head_norm(y) * (1 - self.lambda_init)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)

    def _fused(self, q, k, v, lam, q_pos, k_pos, key_valid):
        """(A1 - lambda A2) V as one SDPA call over the 2H half-heads: q, k (B, 2H, T|S, d),
        v (B, H, S, D) shared by half-heads 2h and 2h + 1."""
        T, S = q.shape[2], k.shape[2]
        v2 = v.repeat_interleave(2, dim=1)  # (B, 2H, S, D)
        if T == S and key_valid is None and q_pos.dim() == 1:
            out = F.scaled_dot_product_attention(q, k, v2, is_causal=True)
        else:
            mask = attention_mask(q_pos, k_pos, 0, key_valid)  # (T, S) or (B, 1, T, S)
            out = F.scaled_dot_product_attention(q, k, v2, attn_mask=mask)
        return out[:, 0::2] - lam * out[:, 1::2]  # (B, H, T, D)
