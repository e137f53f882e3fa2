"""Optimizers: AdamW (fused on CUDA), or Muon for hidden matrices with AdamW for the rest.

Muon orthogonalises the update of each 2-D weight inside the blocks; embeddings, the head,
norm gains and biases keep AdamW, as the Muon authors recommend. PyTorch's own
``torch.optim.Muon`` is used when the installed version has it.
"""

from __future__ import annotations

import torch
from torch import nn

from minlm.config import ConfigError, TrainConfig


def _split_params(model: nn.Module) -> tuple[list, list, list]:
    """(hidden matrices inside blocks, other matrices, vectors) among trainable parameters."""
    hidden, other, vectors = [], [], []
    seen = set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        if p.dim() < 2:
            vectors.append(p)
        elif name.startswith("blocks.") and p.dim() == 2:
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


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    """AdamW with weight decay on matrices only, or Muon + AdamW; each group keeps ``base_lr``
    so the schedule can scale every group by the same factor."""
    hidden, other, vectors = _split_params(model)
    fused = {"fused": True} if device.type == "cuda" else {}
    betas = (cfg.beta1, cfg.beta2)
    if cfg.optimizer == "adamw":
        groups = [{"params": hidden + other, "weight_decay": cfg.weight_decay},
                  {"params": vectors, "weight_decay": 0.0}]
        opt = torch.optim.AdamW(groups, lr=cfg.lr, betas=betas, **fused)
    else:
        if not hasattr(torch.optim, "Muon"):
            raise ConfigError(f"optimizer='muon' needs torch.optim.Muon (PyTorch >= 2.9); this is "
                              f"PyTorch {torch.__version__}; use optimizer=adamw")
        # match_rms_adamw scales Muon's update to AdamW's size, so one lr serves both
        muon = torch.optim.Muon(hidden, lr=cfg.lr, weight_decay=cfg.weight_decay,
                                adjust_lr_fn="match_rms_adamw")
        adam = torch.optim.AdamW([{"params": other, "weight_decay": cfg.weight_decay},
                                  {"params": vectors, "weight_decay": 0.0}],
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
