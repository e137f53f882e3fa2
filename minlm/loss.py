"""Cross-entropy for training: the mean over the targets that count.

The model's head and this loss are the reference; ``minlm.fast.fused_linear_cross_entropy``
computes the same value and gradients without holding the full logits and is what the
trainer's forward uses while ``minlm.fast`` is on.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def masked_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                         loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean cross-entropy over the targets that count (mask > 0 and target != -100)."""
    V = logits.shape[-1]
    flat_logits = logits.reshape(-1, V).float()  # (B*T, V)
    flat_targets = targets.reshape(-1)  # (B*T,)
    if loss_mask is None:
        return F.cross_entropy(flat_logits, flat_targets, ignore_index=-100)
    losses = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="none")
    weights = loss_mask.reshape(-1).to(losses.dtype) * (flat_targets != -100)
    return (losses * weights).sum() / weights.sum().clamp(min=1)
