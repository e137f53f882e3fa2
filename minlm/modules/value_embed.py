"""Value embeddings (modded-nanogpt): extra token-embedding tables mixed into the attention
values of the first and last layers, a cheap way to give attention token identity that the
residual stream has blurred.

Table k serves layer k and layer ``n_layers - value_embeds + k`` (the first and the last
``value_embeds`` layers, in order); each such layer mixes ``v = a * v + b * table[token]``
with two learned scalars (``ValueMix``, starting at 0.5 each). No library has this; it is a
lookup and a weighted sum.

Dimension letters: B batch, T time, K key/value heads, D head size, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import nn

from minlm.errors import ConfigError
from minlm.tracing import LoggingModule


def value_table(cfg, layer_idx: int) -> int | None:
    """Index of the value-embedding table layer ``layer_idx`` mixes in, or None."""
    k, n = cfg.value_embeds, cfg.n_layers
    if layer_idx < k:
        return layer_idx
    if layer_idx >= n - k:
        return layer_idx - (n - k)
    return None


def validate(cfg, layer_mixers) -> None:
    """Value embeddings enter attention's values: the layers that get a table must use only
    ``attention``, and each table serves two distinct layers."""
    k = cfg.value_embeds
    if k < 0:
        raise ConfigError(f"value_embeds={k} is invalid: must be >= 0 (0 disables them)")
    if not k:
        return
    if 2 * k > cfg.n_layers:
        raise ConfigError(f"value_embeds={k} is invalid: table k serves layer k and the k-th of "
                          f"the last {k} layers, so it needs n_layers >= {2 * k} (n_layers="
                          f"{cfg.n_layers}); use value_embeds <= {cfg.n_layers // 2}")
    if cfg.tied_blocks:
        raise ConfigError(f"value_embeds={k} cannot be combined with tied_blocks="
                          f"{cfg.tied_blocks}: a reused block would mix another layer's table")
    for i in range(cfg.n_layers):
        used = layer_mixers(cfg, i)
        if value_table(cfg, i) is not None and set(used) != {"attention"}:
            raise ConfigError(f"value_embeds={k} is invalid: layer {i} gets a value embedding, "
                              f"which only the 'attention' mixer reads, but it uses "
                              f"{', '.join(used)}; use value_embeds=0 or attention in layers "
                              f"0..{k - 1} and {cfg.n_layers - k}..{cfg.n_layers - 1}")


class ValueEmbeddings(LoggingModule):
    """``value_embeds`` tables of (V, K*D); ``forward(idx)`` gives each layer its lookup."""

    def __init__(self, cfg):
        super().__init__()
        width = cfg.kv_heads * cfg.head_size
        self.tables = nn.ModuleList(nn.Embedding(cfg.vocab_size, width)
                                    for _ in range(cfg.value_embeds))
        self.layer_tables = [value_table(cfg, i) for i in range(cfg.n_layers)]

    def forward(self, idx: torch.Tensor) -> list[torch.Tensor | None]:
        """idx (B, T) or (B,) -> per layer (B, T, K*D) or (B, K*D), or None for a layer
        without a table (each table is looked up once)."""
        looked = [t(idx) for t in self.tables]
        return [None if k is None else looked[k] for k in self.layer_tables]


class ValueMix(LoggingModule):
    """``v = a * v + b * ve`` with learned scalars ``weight = (a, b)``."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.full((2,), 0.5))

    @torch.no_grad()
    def reset_special_parameters(self) -> None:  # LM.init_weights sets vectors to 1 first
        self.weight.fill_(0.5)

    def forward(self, v: torch.Tensor, ve: torch.Tensor) -> torch.Tensor:
        return self.weight[0] * v + self.weight[1] * ve
