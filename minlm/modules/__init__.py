"""Building blocks of minlm models, one file per family, all ``LoggingModule``s.

Every config choice maps to a class through a small registry here or beside its family:
``MIXERS`` (``mixer``), ``CHANNEL_MIXERS`` (``activation="kan"``, else the MLP), ``MoE`` when
``n_experts > 0``, ``NORMS`` (``norm``), ``LINEARS`` (``linear``).
"""

from __future__ import annotations

from minlm.modules.attention import Attention, attention_mask
from minlm.modules.bitlinear import LINEARS, BitLinear, PackedBitLinear, make_linear
from minlm.modules.block import STEPS, Block, Parallel, Residual, parse_block_spec
from minlm.modules.kan import KANMLP, KANLinear
from minlm.modules.mlgru import MLGRU
from minlm.modules.mlp import MLP
from minlm.modules.moe import MoE
from minlm.modules.norm import NORMS, make_norm
from minlm.modules.position import ALiBi, LearnedPositions, RoPE, alibi_slopes

MIXERS = {"attention": Attention, "mlgru": MLGRU}
CHANNEL_MIXERS = {"kan": KANMLP}  # by activation; every other activation is an MLP


def make_mixer(cfg, layer_idx: int):
    """The token mixer a config asks for (attention, or the MLGRU recurrence)."""
    return MIXERS[cfg.mixer](cfg, layer_idx)


def make_ffn(cfg):
    """One MLP (or KAN MLP) as the config describes it: the channel mixer, or one expert."""
    return CHANNEL_MIXERS.get(cfg.activation, MLP)(cfg)


def make_channel_mixer(cfg):
    return MoE(cfg, make_ffn) if cfg.n_experts else make_ffn(cfg)


def make_step(step: str, cfg, layer_idx: int):
    """Build one block-spec step (``norm``, ``attn``, ``mlp``) from the config."""
    if step == "norm":
        return make_norm(cfg)
    if step == "attn":
        return make_mixer(cfg, layer_idx)
    if step == "mlp":
        return make_channel_mixer(cfg)
    raise KeyError(step)


__all__ = [
    "CHANNEL_MIXERS",
    "KANMLP",
    "LINEARS",
    "MIXERS",
    "MLGRU",
    "MLP",
    "NORMS",
    "STEPS",
    "ALiBi",
    "Attention",
    "BitLinear",
    "Block",
    "KANLinear",
    "LearnedPositions",
    "MoE",
    "PackedBitLinear",
    "Parallel",
    "Residual",
    "RoPE",
    "alibi_slopes",
    "attention_mask",
    "make_channel_mixer",
    "make_ffn",
    "make_linear",
    "make_mixer",
    "make_norm",
    "make_step",
    "parse_block_spec",
]
