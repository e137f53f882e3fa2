"""Building a model's parts from its config, through the registries: the one place that
turns layout steps (``norm``, ``mixer``, ``mlp``, ``moe``, a mixer's name) into modules.

Apart from the package ``__init__`` so that the parts that build others (``MoE``'s experts) can
import it without a circle.
"""

from __future__ import annotations

from torch import nn

from minlm.modules.block import (_DEFAULT_LAYOUTS, LayoutBlock, PreNormBlock, layer_layouts,
                                 uses_moe_step)
from minlm.modules.norm import make_norm
from minlm.modules.registry import channel_mixer_spec, mixer_spec


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
        return channel_mixer_spec("moe").cls(cfg, make_ffn)
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


def Block(cfg, layer_idx: int = 0) -> nn.Module:
    """Block ``layer_idx`` of a model: a ``PreNormBlock`` for the default layout, else a
    ``LayoutBlock``."""
    layout = layer_layouts(cfg)[layer_idx]
    if layout in _DEFAULT_LAYOUTS:
        return PreNormBlock(make_step("norm", cfg, layer_idx), make_step("mixer", cfg, layer_idx),
                            make_step("norm", cfg, layer_idx), make_step("mlp", cfg, layer_idx))
    return LayoutBlock(layout, lambda kind, i: make_step(kind, cfg, i), layer_idx)
