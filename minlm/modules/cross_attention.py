"""Cross-attention: queries from one sequence, keys and values from another (the decoder of an
encoder-decoder reading the encoder's output, or a model reading an image's patches).

Not a token mixer of ``LM`` (it needs a second sequence), so it is not in the mixer registry;
it is a standalone module, traced like the rest, ready for an encoder-decoder experiment::

    xattn = CrossAttention(dim=128, n_heads=4, context_dim=96)
    y = xattn(x, context, mask)        # x (B, T, C), context (B, S, Cc) -> (B, T, C)

``mask``: (B, S) True for real context tokens (padding False), or (B, T, S) per query; a
query whose every key is masked gets zeros. No causal mask: every query may see all of the
context. Dimension letters: B batch, T queries, S context tokens, C model width,
Cc context width, H heads, D head size.
"""

from __future__ import annotations

import torch
from torch import nn

from minlm.tracing import LoggingModule, Probe


class CrossAttention(LoggingModule):
    def __init__(self, dim: int, n_heads: int, context_dim: int | None = None,
                 head_dim: int | None = None, bias: bool = False):
        super().__init__()
        D = head_dim or dim // n_heads
        if D * n_heads != dim and head_dim is None:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}; pass head_dim")
        self.n_heads, self.head_dim = n_heads, D
        self.q_proj = nn.Linear(dim, n_heads * D, bias=bias)
        self.k_proj = nn.Linear(context_dim or dim, n_heads * D, bias=bias)
        self.v_proj = nn.Linear(context_dim or dim, n_heads * D, bias=bias)
        self.o_proj = nn.Linear(n_heads * D, dim, bias=bias)
        self.q_heads, self.k_heads, self.v_heads = Probe(), Probe(), Probe()
        self.scores, self.probs = Probe(), Probe()

    def forward(self, x: torch.Tensor, context: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        B, T, _ = x.shape
        S = context.shape[1]
        H, D = self.n_heads, self.head_dim
        q = self.q_heads(self.q_proj(x).view(B, T, H, D).transpose(1, 2))  # (B, H, T, D)
        k = self.k_heads(self.k_proj(context).view(B, S, H, D).transpose(1, 2))  # (B, H, S, D)
        v = self.v_heads(self.v_proj(context).view(B, S, H, D).transpose(1, 2))  # (B, H, S, D)
        scores = (q @ k.transpose(-2, -1)) * D ** -0.5  # (B, H, T, S)
        if mask is not None:
            allowed = mask[:, None, None, :] if mask.dim() == 2 else mask[:, None]  # (B, 1, T|1, S)
            scores = scores.masked_fill(~allowed, float("-inf"))
        scores = self.scores(scores)
        probs = torch.softmax(scores.float(), dim=-1).nan_to_num(0.0).to(q.dtype)  # all-masked: 0
        y = self.probs(probs) @ v  # (B, H, T, D)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)

    def extra_flops(self, args, output) -> int:
        x, context = args[0], args[1]
        return 4 * x.shape[0] * self.n_heads * x.shape[1] * context.shape[1] * self.head_dim


__all__ = ["CrossAttention"]
