"""Building blocks of minlm models, one file per family, all ``LoggingModule``s.

Token mixers, channel mixers, norms and positional schemes register themselves
(``minlm.modules.registry``): importing this package imports every built-in file, and each
file's ``@register_mixer`` / ``@register_channel_mixer`` / ``@register_norm`` /
``register_position`` puts it in the registry that ``ModelConfig`` validates names against.
The smaller, closed choice keeps a small dict: ``LINEARS`` (``linear``).
"""

from __future__ import annotations

from minlm.modules.attention import Attention, attention_mask
from minlm.modules.bitlinear import LINEARS, BitLinear, PackedBitLinear, make_linear
from minlm.modules.block import (LayoutBlock, Parallel, PreNormBlock, Residual, layer_layouts,
                                 parse_block_spec, uses_moe_step)
from minlm.modules.build import (Block, dense_channel_mixer, make_channel_mixer, make_ffn,
                                 make_mixer, make_step)
from minlm.modules.cross_attention import CrossAttention
from minlm.modules.griffin import Griffin
from minlm.modules.kan import KANMLP, KANLinear
from minlm.modules.mamba import Mamba
from minlm.modules.mlgru import MLGRU
from minlm.modules.mlp import MLP
from minlm.modules.moe import MoE
from minlm.modules.norm import make_norm
from minlm.modules.position import ALiBi, LearnedPositions, RoPE, alibi_slopes
from minlm.modules.registry import (channel_mixer_spec, channel_mixers, make_position,
                                    mixer_spec, mixers, norms, positions,
                                    register_channel_mixer, register_mixer, register_norm,
                                    register_position)


__all__ = [
    "KANMLP",
    "LINEARS",
    "MLGRU",
    "Mamba",
    "MLP",
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
    "dense_channel_mixer",
    "make_channel_mixer",
    "make_ffn",
    "make_linear",
    "make_mixer",
    "make_norm",
    "make_position",
    "make_step",
    "mixer_spec",
    "mixers",
    "norms",
    "parse_block_spec",
    "positions",
    "register_channel_mixer",
    "register_mixer",
    "register_norm",
    "register_position",
]
