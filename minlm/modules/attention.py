"""Causal self-attention: multi-head, grouped-query and multi-query by ``n_kv_heads``.

Dimension letters: B batch, T query positions, S key positions, C model width,
H query heads, K key/value heads, D head size.

The fast path is ``F.scaled_dot_product_attention``. While a trace records, the scores and
probabilities are also computed explicitly and passed through probes so a learner can see
them; soft-capping needs the explicit path, so it always takes it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

import minlm.fast as fast
import minlm.tracing as tracing
from minlm.errors import ConfigError
import minlm.modules.value_embed as value_embed
from minlm.modules.bitlinear import make_linear
from minlm.modules.block import layer_mixers
from minlm.modules.fastpath import joint_linear
from minlm.modules.norm import RMSNorm
from minlm.modules.position import RoPE
from minlm.modules.registry import TokenMixer, make_position, register_mixer
from minlm.tracing import Identity, Probe


def attention_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int = 0,
                   key_valid: torch.Tensor | None = None) -> torch.Tensor:
    """Boolean mask, True where a query may attend: causal, within ``window``, not padding.

    q_pos: (T,) or (B, T); k_pos: (S,) or (B, S); key_valid: (B, S). Returns (T, S) or (B, 1, T, S).
    """
    diff = q_pos.unsqueeze(-1) - k_pos.unsqueeze(-2)  # (T, S) or (B, T, S)
    allowed = diff >= 0
    if window:
        allowed = allowed & (diff < window)
    if key_valid is not None:
        allowed = allowed & key_valid.unsqueeze(-2)  # (B, T, S)
    if allowed.dim() == 3:
        allowed = allowed.unsqueeze(1)  # (B, 1, T, S)
    return allowed


def _validate(cfg) -> None:
    if isinstance(cfg.position, str) and cfg.position == "rope" and cfg.head_size % 2:
        raise ConfigError(f"head_dim={cfg.head_size} is odd, but position='rope' rotates pairs "
                          "of channels; use an even head size")
    value_embed.validate(cfg, layer_mixers)


def _flops(cfg, T: int) -> float:
    """Scores and weighted sum: 2 x 2 x heads x head size x T keys, per query token (as PaLM
    counts them: the masked half and a window's outside are computed too)."""
    return 4 * cfg.n_heads * cfg.head_size * T


def _memory(cfg, T: int) -> float:
    """Values saved for backward per token: the input, q, k, v, the output (which o_proj
    reads in place) and its log-sum-exp per head; with soft-capping, the probabilities."""
    probs = 3 * cfg.n_heads * T if cfg.attn_softcap else 0
    H, K, D = cfg.n_heads, cfg.kv_heads, cfg.head_size
    return cfg.dim + 2 * H * D + 2 * K * D + H + probs


@register_mixer(
    "attention", state="kv", positional=True, validate=_validate, flops=_flops, memory=_memory,
    config_fields=("window", "qk_norm", "attn_softcap", "value_embeds"),
    examples={"window": 3, "qk_norm": True, "attn_softcap": 5.0, "value_embeds": 1})
class Attention(TokenMixer):
    """Causal self-attention; with a cache, keys and values are appended to a ``KVCache``."""

    def __init__(self, cfg, layer_idx: int = 0):
        super().__init__(cfg)
        C, H, K, D = cfg.dim, cfg.n_heads, cfg.kv_heads, cfg.head_size
        self.n_heads, self.n_kv_heads, self.head_dim = H, K, D
        self.window, self.softcap, self.layer_idx = cfg.window, cfg.attn_softcap, layer_idx
        self.qk_norm = cfg.qk_norm
        self.q_proj = make_linear(cfg, C, H * D, bias=cfg.attn_bias)
        self.k_proj = make_linear(cfg, C, K * D, bias=cfg.attn_bias)
        self.v_proj = make_linear(cfg, C, K * D, bias=cfg.attn_bias)
        self.o_proj = make_linear(cfg, H * D, C, bias=cfg.attn_bias)
        self.q_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else Identity()
        self.k_norm = RMSNorm(D, cfg.norm_eps) if cfg.qk_norm else Identity()
        self.rope = make_position(cfg, "rotary", D) or Identity()  # rotates q and k
        self.alibi = make_position(cfg, "bias", H)  # added to the scores, or None
        # probe points: each shows one inner step in a trace
        self.q_heads, self.k_heads, self.v_heads = Probe(), Probe(), Probe()
        self.scores, self.probs, self.merge_heads = Probe(), Probe(), Probe()
        self.dropout = cfg.dropout
        # value embeddings (value_embeds > 0): this layer's values mix in its table's lookup
        has_table = value_embed.value_table(cfg, layer_idx) is not None
        self.value_mix = value_embed.ValueMix() if has_table else None

    def forward(self, x: torch.Tensor, positions: torch.Tensor | None = None,
                cache=None, key_valid: torch.Tensor | None = None,
                value_embed: torch.Tensor | None = None) -> torch.Tensor:
        """``value_embed`` (B, T, K*D): this layer's value-embedding lookup, if it has one."""
        B, T, C = x.shape
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        if positions is None:
            positions = torch.arange(T, device=x.device)
        q = self.q_heads(self.q_proj(x).view(B, T, H, D).transpose(1, 2))  # (B, H, T, D)
        k = self.k_heads(self.k_proj(x).view(B, T, K, D).transpose(1, 2))  # (B, K, T, D)
        v = self.v_heads(self.v_proj(x).view(B, T, K, D).transpose(1, 2))  # (B, K, T, D)
        if value_embed is not None:
            v = self.value_mix(v, value_embed.view(B, T, K, D).transpose(1, 2))  # (B, K, T, D)
        q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rope(q, positions), self.rope(k, positions)
        k_pos = positions
        if cache is not None:  # this layer's cache (LM passes cache.layer(i)): append, attend to all
            k, v, k_pos, key_valid = cache.update(k, v, positions, key_valid)
        y = self._attend(q, k, v, positions, k_pos, key_valid)  # (B, H, T, D)
        y = self.merge_heads(y.transpose(1, 2).reshape(B, T, H * D))  # (B, T, C)
        return self.o_proj(y)

    def step(self, x: torch.Tensor, positions: torch.Tensor, cache,
             residual: torch.Tensor | None = None,
             value_embed: torch.Tensor | None = None,
             gain: torch.Tensor | None = None) -> torch.Tensor:
        """One new token per row, x (B, C) -> (B, C), appending to ``cache``; the same
        computation as ``forward`` with q/k/v projected by one joined product and q and k
        rotated together. ``positions``: (1,) shared or (B, 1) per row."""
        B = x.shape[0]
        H, K, D = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = joint_linear(self, ("q_proj", "k_proj", "v_proj"), x, gain=gain)  # (B, (H + 2K) D)
        qk = qkv.narrow(1, 0, (H + K) * D).view(B, H + K, 1, D)  # (B, H+K, T=1, D)
        if self.qk_norm:
            qk = torch.cat([self.q_norm(qk[:, :H]), self.k_norm(qk[:, H:])], dim=1)
        rope = self._modules["rope"]
        if type(rope) is RoPE:  # the tables are looked up once per step, for all layers
            key = ("rope", D, rope.theta, fast.enabled())
            tables = cache.parent.step_memo.get(key)
            if tables is None:
                tables = cache.parent.step_memo[key] = rope.tables(positions, qk.dtype)
            qk = rope.rotate(qk, tables)
        v = qkv.narrow(1, (H + K) * D, K * D).view(B, K, 1, D)  # (B, K, 1, D)
        if value_embed is not None:
            v = self.value_mix(v, value_embed.view(B, K, 1, D))  # (B, K, 1, D)
        k, v, k_pos, valid = cache.update(qk.narrow(1, H, K), v, positions)  # (B, K, S, D)
        y = self._attend(qk.narrow(1, 0, H), k, v, positions, k_pos, valid)  # (B, H, 1, D)
        return joint_linear(self, ("o_proj",), y.reshape(B, H * D), residual)  # (B, C)

    def _attend(self, q, k, v, q_pos, k_pos, key_valid):
        H, T, S = q.shape[1], q.shape[2], k.shape[2]
        dropout = self.dropout if self.training else 0.0
        gqa = k.shape[1] != H  # SDPA shares each key/value head without copying it
        if (T == 1 and self.alibi is None and not self.window and key_valid is None
                and not self.softcap and not tracing.enabled()):  # the newest token sees all
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, enable_gqa=gqa)
        if gqa and (self.softcap or tracing.enabled()):  # the explicit path needs H heads
            rep = H // k.shape[1]
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)  # (B, H, S, D)
            gqa = False
        plain_causal = (self.alibi is None and not self.window and key_valid is None
                        and T == S and q_pos.dim() == 1)
        if self.softcap or tracing.enabled():
            probs = self._explicit_probs(q, k, q_pos, k_pos, key_valid)
            if self.softcap:
                probs = F.dropout(probs, dropout, self.training)
                return probs @ v
        if plain_causal:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout,
                                                  enable_gqa=gqa)
        mask = attention_mask(q_pos, k_pos, self.window, key_valid)
        if self.alibi is not None:
            bias = self.alibi(q_pos, k_pos).to(q.dtype)
            mask = bias.masked_fill(~mask, float("-inf"))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout,
                                              enable_gqa=gqa)

    def _explicit_probs(self, q, k, q_pos, k_pos, key_valid):
        scores = (q @ k.transpose(-2, -1)) * self.head_dim ** -0.5  # (B, H, T, S)
        if self.softcap:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        if self.alibi is not None:
            scores = scores + self.alibi(q_pos, k_pos).to(scores.dtype)
        mask = attention_mask(q_pos, k_pos, self.window, key_valid)
        scores = self.scores(scores.masked_fill(~mask, float("-inf")))
        return self.probs(torch.softmax(scores.float(), dim=-1).to(q.dtype))
