"""Rough training-memory estimates, to explain an out-of-memory error before it is a mystery."""

from __future__ import annotations

from minlm.config import ModelConfig


def estimate_training_bytes(cfg: ModelConfig, batch_size: int, bytes_per_value: int = 4) -> int:
    """Weights + grads + AdamW moments (4 copies of the params) plus activations kept for backward.

    The activation term counts, per layer and token, the tensors a pre-norm block saves
    (about 16 x dim plus the MLP hidden width x 3 and the attention probabilities when they are
    materialised), then the logits. An estimate to within a factor of ~2, not a measurement.
    """
    from minlm.runs import estimate_params

    params = estimate_params(cfg)
    tokens = batch_size * cfg.block_size
    per_token_layer = 16 * cfg.dim + 3 * cfg.ffn_dim + cfg.n_heads * min(cfg.block_size, 1024) // 8
    activations = tokens * (cfg.n_layers * per_token_layer + 2 * cfg.vocab_size)
    return bytes_per_value * (4 * params + activations)
