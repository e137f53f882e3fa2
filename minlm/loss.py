"""Cross-entropy for training: the plain masked form, and a fused head + loss that never holds
the full (B*T, V) logits.

The fused form exists for speed. Computing the logits, their log-softmax, and then their
gradient in a separate backward pass reads and writes a B*T x V tensor four or five times;
at 1M parameters that tensor is the largest one in the step (64 MB for 32 x 256 tokens and a
2048-piece vocabulary) and those passes took over a tenth of a llama-1m step on a 2-core CPU
(profiled). Here each chunk of rows computes its logits, loss and gradient in one go during the
forward, while the chunk is still in cache; the backward only scales the stored gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# logits per chunk (8 MB in fp32): on a 2-core EPYC the fused loss at 4096 x 128 -> 2048 took
# 78 ms forward+backward with this, 81 with half and 96 with double (alternating repeats)
CHUNK_ELEMENTS = 1 << 21


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits the fused loss computes at once (what it holds beyond its gradients)."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


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


class _FusedLinearCrossEntropy(torch.autograd.Function):
    """loss = sum_i w_i * CE(h_i @ W.T, y_i) / sum_i w_i, gradients computed in the forward."""

    @staticmethod
    def forward(ctx, h, weight, targets, weights, chunk):
        # h: (N, C) in the compute dtype (bf16 under autocast); weight: (V, C); targets,
        # weights: (N,). Autocast is off inside: dtypes are chosen here, explicitly.
        with torch.autocast(h.device.type, enabled=False):
            compute = h.dtype
            w = weight.to(compute)
            total = weights.sum().clamp(min=1)
            scale = (weights / total).float()  # (N,) each row's share of the mean
            grad_h = torch.empty_like(h)
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device)
            loss = torch.zeros((), dtype=torch.float32, device=h.device)
            for start in range(0, h.shape[0], chunk):
                rows = slice(start, start + chunk)
                hs, ys = h[rows], targets[rows]
                logits = (hs @ w.t()).float()  # (n, V)
                picked = logits.gather(1, ys[:, None])  # (n, 1) the targets' logits
                peak = logits.amax(dim=-1, keepdim=True)  # (n, 1)
                probs = logits.sub_(peak).exp_()  # in place: unnormalised softmax
                total_exp = probs.sum(dim=-1, keepdim=True)  # (n, 1)
                lse = peak + total_exp.log()  # log-sum-exp of the logits
                loss += ((lse - picked).squeeze(1) * scale[rows]).sum()
                probs.mul_(scale[rows, None] / total_exp)  # softmax times the row's share
                probs[torch.arange(len(ys), device=h.device), ys] -= scale[rows]  # d loss / d logits
                g = probs.to(compute)
                grad_h[rows] = g @ w
                grad_w.add_((g.t() @ hs).float())
        ctx.save_for_backward(grad_h, grad_w.to(weight.dtype))
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w = ctx.saved_tensors
        return grad_h * grad_loss.to(grad_h.dtype), grad_w * grad_loss, None, None, None


def fused_linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                               loss_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``masked_cross_entropy(h @ weight.T, targets, loss_mask)`` without the full logits.

    h: (B, T, C) final hidden states; weight: (V, C) the head. Same value and gradients as the
    plain form (up to float rounding); differentiable once (no double backward).
    """
    C, V = h.shape[-1], weight.shape[0]
    device = h.device.type
    compute = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else h.dtype
    flat_h = h.reshape(-1, C).to(compute)
    flat_targets = targets.reshape(-1)
    valid = flat_targets != -100
    weights = valid.float() if loss_mask is None else loss_mask.reshape(-1).float() * valid
    safe_targets = flat_targets.masked_fill(~valid, 0)  # ignored rows have weight 0
    return _FusedLinearCrossEntropy.apply(flat_h, weight, safe_targets, weights, chunk_rows(V))
