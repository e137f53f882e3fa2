"""Speed tricks, kept apart from the reference code and selected by one switch.

The modules a learner reads (``minlm.modules.norm``, ``minlm.modules.position``,
``minlm.loss``, ``minlm.optim``) are plain PyTorch. Where a hand-written version of the same
computation trains faster, it lives here, and the reference code hands over to it only while
the switch is on:

- ``rms_norm`` stands in for ``RMSNorm.forward`` (fp32, with a gain): a hand-written backward
  from the saved normalised input, in fewer elementwise passes than autograd composes for the
  formula.
- ``rope_rotate`` stands in for ``RoPE.rotate`` (``x * cos + rotate_half(x) * sin``): one
  ``roll`` and one ``addcmul``, rotate_half's minus sign folded into the sine table.
- ``fused_linear_cross_entropy`` stands in for the head followed by
  ``loss.masked_cross_entropy`` in the trainer's forward: chunk by chunk, gradients computed in
  the forward, so the (B*T, V) logits are never held and each chunk is used while in cache.
- ``muon_ns_dtype`` stands in for ``torch.optim.Muon``'s bf16 Newton-Schulz steps on CPUs that
  emulate bf16: minlm's ``optim.Muon`` takes the same steps in fp32 there.

The switch is on by default, so training keeps its speed. It is off, and the reference code
runs everywhere, with ``MINLM_FAST=0`` in the environment (read at import, so it reaches the
CLI, subprocesses and torchrun workers), ``minlm.fast.set_enabled(False)``, or inside
``with minlm.fast.use(False):``. It changes no parameter and no saved file, only how the same
values are computed: tests/test_fast.py checks every trick's values and gradients against its
reference, and ``bench/fast_paths.py`` times each pair side by side.

Dimension letters: N rows (B*T), C width, V vocabulary, D head size.
"""

from __future__ import annotations

import contextlib
import os
from typing import Iterator

import torch


def _from_environment() -> bool:
    raw = os.environ.get("MINLM_FAST", "1").strip()
    if raw not in ("0", "1"):
        raise ValueError(f"MINLM_FAST={raw!r} is invalid: must be 1 (speed tricks on, the "
                         "default) or 0 (the reference code everywhere)")
    return raw == "1"


_enabled = _from_environment()


def enabled() -> bool:
    """Whether the speed tricks run (the switch; on unless turned off)."""
    return _enabled


def set_enabled(flag: bool) -> None:
    """Turn the speed tricks on or off for this process."""
    global _enabled
    _enabled = bool(flag)


@contextlib.contextmanager
def use(flag: bool) -> Iterator[None]:
    """The switch set to ``flag`` inside the block, restored after it."""
    before = _enabled
    set_enabled(flag)
    try:
        yield
    finally:
        set_enabled(before)


# --- RMSNorm ------------------------------------------------------------------------------

class _RMSNormFunction(torch.autograd.Function):
    """RMSNorm's formula with a hand-written backward. The forward computes exactly what the
    reference does; the backward works from the normalised input it saved, where autograd
    differentiates the formula op by op."""

    @staticmethod
    def forward(ctx, x, weight, eps):
        inv_rms = torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)  # (..., 1)
        normed = x * inv_rms  # (..., C)
        ctx.save_for_backward(normed, weight, inv_rms)
        return normed * weight

    @staticmethod
    def backward(ctx, grad):
        normed, weight, inv_rms = ctx.saved_tensors
        grad_normed = grad * weight
        # d normed / d x = inv_rms * (I - normed normed^T / C): remove the radial component
        radial = torch.linalg.vecdot(grad_normed, normed, dim=-1).unsqueeze(-1) / normed.shape[-1]
        grad_x = (grad_normed - normed * radial) * inv_rms
        grad_weight = (grad * normed).reshape(-1, normed.shape[-1]).sum(0)  # (C,)
        return grad_x, grad_weight, None


def rms_norm_applies(x: torch.Tensor, weight: torch.Tensor | None) -> bool:
    """Whether ``rms_norm`` serves this call: fp32 input and a gain of the same dtype (other
    dtypes go through the reference, which upcasts)."""
    return weight is not None and x.dtype == torch.float32 and weight.dtype == torch.float32


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``RMSNorm.forward`` for fp32 ``x`` (..., C) and gain (C,): the same values (bitwise),
    gradients equal up to float rounding."""
    return _RMSNormFunction.apply(x, weight, eps)


# --- RoPE ---------------------------------------------------------------------------------

def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """The sine table (..., D) with rotate_half's minus sign folded in: its first half negated.
    With it, ``rotate_half(x) * sin == x.roll(D // 2, -1) * signed_sin(sin)``."""
    half = sin.shape[-1] // 2
    return torch.cat((-sin[..., :half], sin[..., half:]), dim=-1)


def rope_rotate(x: torch.Tensor, cos: torch.Tensor, signed: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` given ``signed = signed_sin(sin)``: a roll by half the
    head replaces the negate-and-concatenate, and one ``addcmul`` the last multiply and add."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed)


# --- head + cross-entropy -----------------------------------------------------------------

CHUNK_ELEMENTS = 1 << 21  # fp32 logits per chunk (8 MB); bench/fast_paths.py --chunks compares


def chunk_rows(vocab_size: int) -> int:
    """Rows of logits the fused loss computes at once (what it holds beyond its gradients)."""
    return max(1, CHUNK_ELEMENTS // vocab_size)


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
    flat_h = h.reshape(-1, C).to(compute)  # (N, C)
    flat_targets = targets.reshape(-1)  # (N,)
    valid = flat_targets != -100
    weights = valid.float() if loss_mask is None else loss_mask.reshape(-1).float() * valid
    safe_targets = flat_targets.masked_fill(~valid, 0)  # ignored rows have weight 0
    return _FusedLinearCrossEntropy.apply(flat_h, weight, safe_targets, weights, chunk_rows(V))


def fused_loss_workspace(rows: int, vocab_size: int) -> int:
    """Bytes of fp32 logits the fused loss holds outside autograd (one chunk) for ``rows``."""
    return min(rows, chunk_rows(vocab_size)) * vocab_size * 4


# --- Muon ---------------------------------------------------------------------------------

def muon_ns_dtype(bf16_emulated: bool) -> torch.dtype | None:
    """fp32 for Muon's Newton-Schulz steps where the device emulates bf16 (a CPU without fast
    bf16, see ``minlm.flops.cpu_bf16_is_faster``), else None: the reference,
    ``torch.optim.Muon`` with its bf16 steps. The fp32 steps give the same update up to bf16
    rounding (tested)."""
    return torch.float32 if _enabled and bf16_emulated else None
