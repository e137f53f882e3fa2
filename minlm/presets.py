"""Named model presets: one family per seed project, in sizes from ~0.5M to ~40M parameters.

The number in a name is the total parameter count with tied embeddings (checked by a test).
Vocabulary sizes match the tokenizers shipped in ``tokenizers/`` (512/1024/2048/4096/8192) so
every preset trains as is; ``lillm-39m`` keeps its published 8192.
"""

from __future__ import annotations

import math

_GPT2 = dict(position="learned", norm="layernorm", norm_bias=True, activation="gelu",
             attn_bias=True, mlp_bias=True, hidden_mult=4.0, tie_embeddings=True, init="normal")
_LLAMA = dict(position="rope", norm="rmsnorm", activation="swiglu", tie_embeddings=True,
              init="normal")

# name suffix -> (vocab_size, block_size, dim, n_layers, n_heads, n_kv_heads for llama)
_SIZES = {
    "0.5m": (1024, 256, 96, 4, 4, 2),
    "1m": (2048, 256, 128, 4, 4, 2),
    "5m": (4096, 256, 256, 5, 8, 4),
    "10m": (4096, 256, 384, 6, 6, 2),
    "20m": (4096, 512, 512, 6, 8, 4),
    "40m": (4096, 512, 512, 12, 8, 4),
}


def _sized(family: dict, size: tuple, gqa: bool) -> dict:
    vocab, block, dim, layers, heads, kv = size
    return dict(family, vocab_size=vocab, block_size=block, dim=dim, n_layers=layers,
                n_heads=heads, n_kv_heads=kv if gqa else 0)


PRESETS: dict[str, dict] = {}  # grouped by family, smallest first (error messages list them so)
for _suffix, _size in _SIZES.items():
    PRESETS[f"gpt2-{_suffix}"] = _sized(_GPT2, _size, gqa=False)
for _suffix, _size in _SIZES.items():
    PRESETS[f"llama-{_suffix}"] = _sized(_LLAMA, _size, gqa=True)

# The seed author's series of three ~0.5M-parameter shapes, for one recipe and budget: short and
# thick (2 layers of 128), medium (llama-0.5m itself: 4 of 96), tall and skinny (9 of 64).
PRESETS["llama-0.5m-short"] = dict(PRESETS["llama-0.5m"], dim=128, n_layers=2)
PRESETS["llama-0.5m-tall"] = dict(PRESETS["llama-0.5m"], dim=64, n_layers=9)

# Grok-1 as minGrok (evintunador) published it at ~1M: extra post-attention / post-MoE norms,
# 4 GeGLU experts of width 2*dim with top-2 routing, multi-query attention with tanh-capped
# scores (30), RoPE theta 100, embeddings scaled by sqrt(dim). Vocab 512 (minGrok: 128 chars).
PRESETS["grok-1m"] = dict(
    vocab_size=512, block_size=256, dim=96, n_layers=4, n_heads=4, n_kv_heads=1, head_dim=24,
    position="rope", rope_theta=100.0, attn_softcap=30.0, norm="rmsnorm",
    block_spec="norm>attn>norm>+ norm>mlp>norm>+", activation="geglu", hidden_dim=192,
    n_experts=4, experts_top_k=2, embed_scale=math.sqrt(96), tie_embeddings=True, init="normal")

# Alilama (JohannesVod) "alilama_2M": ALiBi, pre-norm LayerNorm, SiLU MLP of 4x width, no
# linear biases, xavier-normal init, tied embeddings.
PRESETS["alilama-2m"] = dict(
    vocab_size=4096, block_size=128, dim=128, n_layers=8, n_heads=8, position="alibi",
    norm="layernorm", norm_bias=True, activation="silu", hidden_mult=4.0, attn_bias=False,
    mlp_bias=False, init="xavier", tie_embeddings=True)

# lilLM (CohleM), 39M as published: RMSNorm (eps 1e-6), RoPE, SwiGLU (2/3 * 4d rounded up to a
# multiple of 256 = 1536), GQA with 16 query / 8 key-value heads, d 512, 12 layers, vocab 8192.
PRESETS["lillm-39m"] = dict(
    vocab_size=8192, block_size=512, dim=512, n_layers=12, n_heads=16, n_kv_heads=8,
    position="rope", norm="rmsnorm", norm_eps=1e-6, activation="swiglu", multiple_of=256,
    tie_embeddings=True, init="normal")

# MatMul-free LM (Zhu et al. 2024): MLGRU token mixer and GLU channel mixer, every linear layer
# in the blocks a ternary BitLinear; no position encoding (the recurrence is ordered).
PRESETS["matmulfree-1m"] = dict(
    vocab_size=2048, block_size=256, dim=128, n_layers=4, n_heads=4, mixer="mlgru",
    position="none", linear="bitlinear", activation="swiglu", norm="rmsnorm",
    tie_embeddings=True, init="normal")

# BitNet b1.58 (Ma et al. 2024): the Llama architecture with every block linear a BitLinear.
PRESETS["bitnet-1m"] = dict(PRESETS["llama-1m"], linear="bitlinear")

# Mixtral-style mixture of experts on the Llama architecture: 8 SwiGLU experts, top-2 routing.
PRESETS["moe-1m"] = dict(
    _LLAMA, vocab_size=1024, block_size=256, dim=128, n_layers=4, n_heads=4, n_kv_heads=2,
    n_experts=8, experts_top_k=2, hidden_dim=64, aux_loss_weight=0.01)

# Mamba (Gu & Dao 2023): a stack of selective state-space mixers and no MLP (the Mamba block
# is the whole layer); no position encoding (the recurrence is ordered).
_RECURRENT = dict(vocab_size=2048, block_size=256, dim=128, n_heads=4, position="none",
                  norm="rmsnorm", tie_embeddings=True, init="normal")
PRESETS["mamba-1m"] = dict(_RECURRENT, n_layers=6, mixer="mamba", block_spec="norm>mixer>+")

# Hawk (De et al. 2024): Griffin's recurrent block (conv + RG-LRU) and a SwiGLU MLP per layer.
PRESETS["griffin-1m"] = dict(_RECURRENT, n_layers=3, mixer="griffin", activation="swiglu")

# Griffin proper: two recurrent layers, then one of sliding-window (local) attention with RoPE,
# repeated through the per-layer layout list (here 4 layers: griffin, griffin, attention, griffin).
PRESETS["hybrid-1m"] = dict(
    _RECURRENT, n_layers=4, n_kv_heads=2, mixer="griffin", activation="swiglu",
    position="rope", window=64,
    block_spec=["norm>mixer>+ norm>mlp>+", "norm>mixer>+ norm>mlp>+", "norm>attention>+ norm>mlp>+"])
