"""Optimizers: AdamW (fused on CUDA), or Muon for hidden matrices with AdamW for the rest.

Muon orthogonalises the update of each 2-D weight inside the blocks; embeddings, the head,
norm gains and biases keep AdamW, as the Muon authors recommend. PyTorch's own
``torch.optim.Muon`` is the reference, used when the installed version has it; ``Muon`` below
takes the same steps (with PyTorch versions that lack it), or the same steps in fp32 where
``minlm.fast.muon_ns_dtype`` asks for it: on CPUs that emulate the bf16 of PyTorch's
Newton-Schulz iteration.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import minlm.fast as fast
from minlm.config import TrainConfig
from minlm.modules.bitlinear import LINEARS


def _split_params(model: nn.Module) -> tuple[list, list, list]:
    """(hidden matrices inside blocks, other matrices, vectors) among trainable parameters.

    Hidden matrices are the weights of the blocks' linear layers only: a 2-D parameter that is
    not a linear map (Mamba's ``A_log``, a table of decays per channel and state) is no matrix
    to orthogonalise, so it stays with AdamW.
    """
    linear_weights = {id(m.weight) for name, m in model.named_modules()
                      if name.startswith("blocks.") and isinstance(m, tuple(LINEARS.values()))}
    hidden, other, vectors = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            vectors.append(p)
        elif id(p) in linear_weights and p.dim() == 2:
            hidden.append(p)
        else:
            other.append(p)
    return hidden, other, vectors


class MultiOptimizer(torch.optim.Optimizer):
    """Steps several optimizers as one: one ``param_groups`` list, one state dict."""

    def __init__(self, optimizers: list[torch.optim.Optimizer]):
        self.optimizers = optimizers
        self.param_groups = [g for o in optimizers for g in o.param_groups]
        self.defaults = {}
        self.state = {}

    def step(self, closure=None):
        for o in self.optimizers:
            o.step()

    def zero_grad(self, set_to_none: bool = True):
        for o in self.optimizers:
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self):
        return {"optimizers": [o.state_dict() for o in self.optimizers]}

    def load_state_dict(self, state):
        for o, s in zip(self.optimizers, state["optimizers"]):
            o.load_state_dict(s)


NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # the quintic of the Muon authors


def orthogonalise(g: torch.Tensor, steps: int = 5, dtype: torch.dtype = torch.float32,
                  eps: float = 1e-7) -> torch.Tensor:
    """Newton-Schulz approximation of the nearest semi-orthogonal matrix to ``g`` (its
    singular values pushed towards 1, roughly into [0.7, 1.2]), in ``dtype``."""
    a, b, c = NS_COEFFICIENTS
    wide = g.shape[0] <= g.shape[1]
    x = (g if wide else g.T).to(dtype)  # iterate on the smaller Gram matrix
    x = x / x.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = x @ x.T
        x = torch.addmm(x, torch.addmm(gram, gram, gram, beta=b, alpha=c), x, beta=a)
    return x if wide else x.T


class Muon(torch.optim.Optimizer):
    """Muon (momentum, then an orthogonalised update) with the Newton-Schulz steps in
    ``ns_dtype``; with bf16 it takes the same steps as ``torch.optim.Muon`` (a test checks),
    the learning rate scaled by 0.2 sqrt(max(rows, cols)) to match AdamW's update size."""

    def __init__(self, params, lr: float = 1e-3, weight_decay: float = 0.1,
                 momentum: float = 0.95, nesterov: bool = True, ns_steps: int = 5,
                 ns_dtype: torch.dtype = torch.float32):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      nesterov=nesterov, ns_steps=ns_steps))
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mu)
                update = p.grad.lerp(buf, mu) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_steps"], self.ns_dtype)
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * 0.2 * math.sqrt(max(p.shape[:2])))


def _muon(params: list, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """PyTorch's Muon, or ours in the dtype ``minlm.fast`` asks for (fp32 on emulated bf16)."""
    from minlm.flops import cpu_bf16_is_faster

    ns_dtype = fast.muon_ns_dtype(device.type == "cpu" and not cpu_bf16_is_faster())
    if ns_dtype is not None:
        return Muon(params, lr=cfg.lr, weight_decay=cfg.weight_decay, ns_dtype=ns_dtype)
    if not hasattr(torch.optim, "Muon"):  # PyTorch < 2.9: ours, with the same bf16 steps
        return Muon(params, lr=cfg.lr, weight_decay=cfg.weight_decay, ns_dtype=torch.bfloat16)
    # match_rms_adamw scales Muon's update to AdamW's size, so one lr serves both
    return torch.optim.Muon(params, lr=cfg.lr, weight_decay=cfg.weight_decay,
                            adjust_lr_fn="match_rms_adamw")


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only, or Muon + AdamW; each group keeps ``base_lr``
    so the schedule can scale every group by the same factor."""
    hidden, other, vectors = _split_params(model)
    fused = {"fused": True} if device.type == "cuda" else {}
    betas = (cfg.beta1, cfg.beta2)
    embed = {"params": other, "weight_decay": cfg.weight_decay, "lr": cfg.lr * cfg.embed_lr_mult}
    if cfg.optimizer == "adamw":
        # one group for all matrices unless their rates differ (checkpoints keep their layout)
        matrices = ([{"params": hidden + other, "weight_decay": cfg.weight_decay}]
                    if cfg.embed_lr_mult == 1
                    else [{"params": hidden, "weight_decay": cfg.weight_decay}, embed])
        groups = [*matrices, {"params": vectors, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **fused)
    else:
        muon = _muon(hidden, cfg, device)
        adam = torch.optim.AdamW([embed, {"params": vectors, "weight_decay": 0.0}],
                                 lr=cfg.lr, betas=betas, **fused)
        opt = MultiOptimizer([muon, adam])
    for g in opt.param_groups:
        g["base_lr"] = g["lr"]
    return opt


def set_lr(optimizer: torch.optim.Optimizer, lr: float, base_lr: float) -> None:
    """Scale every group's own base rate by ``lr / base_lr`` (warmup and decay)."""
    factor = lr / base_lr
    for g in optimizer.param_groups:
        g["lr"] = g.get("base_lr", base_lr) * factor


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then decay to ``lr * min_lr_ratio``.

    ``progress`` (0..1) overrides ``step / max_iters`` for the decay, e.g. for time budgets.
    ``wsd`` (warm-up, stable, decay) holds ``lr`` until the last ``decay_frac`` of progress,
    then decays linearly: a run can be stopped (or branched off) at any point of the flat
    part, and the short linear cooldown is what modded-nanogpt uses.
    """
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "constant":
        return cfg.lr
    if progress is None:
        span = max(1, cfg.max_iters - cfg.warmup_iters)
        progress = (step - cfg.warmup_iters) / span
    progress = min(max(progress, 0.0), 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "wsd":  # flat, then linear over the last decay_frac
        progress = max(0.0, progress - (1 - cfg.decay_frac)) / cfg.decay_frac
    if cfg.schedule in ("linear", "wsd"):
        return min_lr + (cfg.lr - min_lr) * (1 - progress)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def batch_size_at(step: int, cfg: TrainConfig, multiple: int = 1) -> int:
    """Global batch size of 0-based ``step``: with ``batch_warmup_iters``, linear from
    ``batch_warmup_start * batch_size`` to ``batch_size`` (small batches make the first,
    noisiest steps cheap), rounded down to a multiple of ``multiple`` (the processes, each of
    which takes an equal share) and never below it."""
    B = cfg.batch_size
    if step >= cfg.batch_warmup_iters:
        return B
    start = cfg.batch_warmup_start * B
    size = start + (B - start) * step / cfg.batch_warmup_iters
    return max(multiple, int(size) // multiple * multiple)
