"""Building blocks of minlm models, one file per family, all ``LoggingModule``s.

Token mixers and channel mixers register themselves (``minlm.modules.registry``): importing
this package imports every built-in file, and each file's ``@register_mixer`` /
``@register_channel_mixer`` puts it in the registry that ``ModelConfig`` validates names
against. Smaller choices keep small dicts: ``NORMS`` (``norm``), ``LINEARS`` (``linear``).
"""

from __future__ import annotations

from minlm.modules.attention import Attention, attention_mask
from minlm.modules.bitlinear import LINEARS, BitLinear, PackedBitLinear, make_linear
from minlm.modules.block import (Block, LayoutBlock, Parallel, PreNormBlock, Residual,
                                 layer_layouts, parse_block_spec, uses_moe_step)
from minlm.modules.cross_attention import CrossAttention
from minlm.modules.griffin import Griffin
from minlm.modules.kan import KANMLP, KANLinear
from minlm.modules.mamba import Mamba
from minlm.modules.mlgru import MLGRU
from minlm.modules.mlp import MLP
from minlm.modules.moe import MoE
from minlm.modules.norm import NORMS, make_norm
from minlm.modules.position import ALiBi, LearnedPositions, RoPE, alibi_slopes
from minlm.modules.registry import (channel_mixer_spec, channel_mixers, mixer_spec, mixers,
                                    register_channel_mixer, register_mixer)


def make_mixer(cfg, layer_idx: int, name: str | None = None):
    """The token mixer ``name`` (default: the config's ``mixer``) for layer ``layer_idx``."""
    return mixer_spec(name or cfg.mixer).cls(cfg, layer_idx)


def dense_channel_mixer(cfg) -> str:
    """The non-MoE channel mixer a config asks for: ``kan`` by ``activation``, else ``mlp``."""
    if cfg.mlp and cfg.mlp != "moe":
        return cfg.mlp
    return "kan" if cfg.activation == "kan" else "mlp"


def make_ffn(cfg):
    """One dense channel mixer as the config describes it: a layer's, or one expert."""
    return channel_mixer_spec(dense_channel_mixer(cfg)).cls(cfg)


def make_channel_mixer(cfg, kind: str = "mlp"):
    """The channel mixer of an ``mlp`` step (``cfg.channel_mixer``) or of a ``moe`` step."""
    if kind == "moe":
        return MoE(cfg, make_ffn)
    if uses_moe_step(cfg):  # a layout with explicit moe steps keeps its mlp steps dense
        return make_ffn(cfg)
    return channel_mixer_spec(cfg.channel_mixer).cls(cfg)


def make_step(step: str, cfg, layer_idx: int):
    """Build one layout step (``norm``, ``mixer``, a mixer's name, ``mlp``, ``moe``)."""
    if step == "norm":
        return make_norm(cfg)
    if step in ("mlp", "moe"):
        return make_channel_mixer(cfg, step)
    return make_mixer(cfg, layer_idx, None if step in ("mixer", "attn") else step)


__all__ = [
    "KANMLP",
    "LINEARS",
    "MLGRU",
    "Mamba",
    "MLP",
    "NORMS",
    "ALiBi",
    "Attention",
    "BitLinear",
    "Block",
    "CrossAttention",
    "Griffin",
    "KANLinear",
    "LayoutBlock",
    "LearnedPositions",
    "MoE",
    "PackedBitLinear",
    "Parallel",
    "PreNormBlock",
    "Residual",
    "RoPE",
    "alibi_slopes",
    "attention_mask",
    "channel_mixer_spec",
    "channel_mixers",
    "layer_layouts",
    "make_channel_mixer",
    "make_ffn",
    "make_linear",
    "make_mixer",
    "make_norm",
    "make_step",
    "mixer_spec",
    "mixers",
    "parse_block_spec",
    "register_channel_mixer",
    "register_mixer",
]
