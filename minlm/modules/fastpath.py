"""One-token decoding helpers that mixers' ``step()`` methods share.

With one token per row a small model spends its time in per-op overhead and in reading
weights, not in arithmetic. ``joint_linear`` applies several sibling linear layers to one
input as a single product with their weights side by side and stored input-major (a
(B, in) @ (in, out) product streams the matrix row by row, markedly faster on a CPU than
``F.linear``'s (out, in) layout). The joined copy is made once and rebuilt when any weight
changes (its storage or its version counter), and is used only without autograd and only
when every layer is a plain ``nn.Linear``; otherwise (BitLinear, a LoRA wrapper, a trace
recording) the layers' own modules run, so nothing they add is skipped.

A ``gain`` (in,) that scales the input first, the weight of the RMSNorm in front of the
layers, is folded into the joined copy's rows: (x * g) @ W = x @ (g[:, None] * W), one
element-wise pass less per norm and token. It is checked like the weights.
"""

from __future__ import annotations

import torch
from torch import nn


def joint_linear(owner: nn.Module, names: tuple[str, ...], x: torch.Tensor,
                 residual: torch.Tensor | None = None,
                 gain: torch.Tensor | None = None) -> torch.Tensor:
    """``torch.cat([owner.<name>(x * gain) for name in names], -1)`` for x (B, in), fast when
    it can; plus ``residual`` if given (added in the same ``addmm`` as the product)."""
    modules = owner._modules
    entry = owner.__dict__.get("_joint_weights", {}).get(names)
    if entry is not None and not torch.is_grad_enabled():
        weight, bias, owned, folded = entry
        valid = folded is None if gain is None else (
            folded is not None and folded[0] is gain and gain._version == folded[1])
        if valid:
            for name, (m, w, version) in zip(names, owned):
                if modules[name] is not m or m._parameters["weight"] is not w \
                        or w._version != version or m._forward_hooks:
                    break
            else:  # the joined copy is still that of these very layers, weights and gain
                return _product(x, weight, bias, residual)
    mods = [modules[n] for n in names]
    if torch.is_grad_enabled() or not all(type(m) is nn.Linear and not m._forward_hooks
                                          for m in mods) \
            or (gain is not None and gain.dtype != mods[0].weight.dtype):
        if gain is not None:
            x = x * gain
        out = [m(x) for m in mods]
        out = out[0] if len(out) == 1 else torch.cat(out, dim=-1)
        return out if residual is None else residual + out
    weights = [m.weight for m in mods]
    weight = torch.cat(weights).t().contiguous()  # (in, out)
    if gain is not None:
        weight.mul_(gain.unsqueeze(1))  # (in, out): row i scaled by g_i
    biases = [m.bias for m in mods]
    bias = None if any(b is None for b in biases) else torch.cat(biases)
    owned = [(m, w, w._version) for m, w in zip(mods, weights)]
    folded = None if gain is None else (gain, gain._version)
    owner.__dict__.setdefault("_joint_weights", {})[names] = (weight, bias, owned, folded)
    return _product(x, weight, bias, residual)


def _product(x, weight, bias, residual):
    if residual is None:
        return torch.mm(x, weight) if bias is None else torch.addmm(bias, x, weight)
    return torch.addmm(residual if bias is None else residual + bias, x, weight)
