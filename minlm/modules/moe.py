"""Mixture-of-experts channel mixer: a router sends each token to its top-k expert MLPs.

Used in place of the MLP when ``n_experts > 0``. Each expert is the MLP the config would build
otherwise (so ``activation`` and ``linear`` apply to experts too; the router stays a plain
``nn.Linear``). The output is the sum of the chosen experts' outputs weighted by their router
probabilities (softmax over all experts, not renormalised over the k: Switch, GShard and
minGrok do the same). No capacity limit: every token is processed by exactly k experts.

Load balancing (Switch Transformer, Fedus et al. 2021): ``aux = E * sum_e f_e * P_e`` with
f_e the share of the N*k token-slots sent to expert e and P_e its mean router probability.
It is 1 when routing is uniform and grows as the load concentrates; ``LM`` adds
``aux_loss_weight`` times its mean over layers to the training loss.

Dimension letters: B batch, T time, C model width, N tokens (B*T), E experts, k chosen.
"""

from __future__ import annotations

import torch
from torch import nn

from minlm.modules.build import dense_channel_mixer, make_ffn
from minlm.modules.registry import channel_mixer_spec, register_channel_mixer
from minlm.tracing import LoggingModule, Probe


def load_balancing_loss(probs: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """E * sum_e f_e * P_e from router probabilities (N, E) and a 0/1 dispatch mask (N, E)."""
    E = probs.shape[-1]
    f = chosen.float().mean(0) / chosen.float().sum(-1).mean().clamp(min=1)  # (E,): sums to 1
    P = probs.float().mean(0)  # (E,)
    return E * (f * P).sum()


def _validate(cfg) -> None:
    if cfg.n_experts < 1:
        from minlm.errors import ConfigError

        raise ConfigError(f"n_experts={cfg.n_experts} is invalid with a mixture of experts: "
                          "must be >= 1 (e.g. 8)")


@register_channel_mixer("moe", config_fields=("n_experts", "experts_top_k", "aux_loss_weight"),
                        examples={"n_experts": 3, "experts_top_k": 1, "aux_loss_weight": 0.1}, validate=_validate,
                        requires={"n_experts": 4, "experts_top_k": 2, "hidden_dim": 32},
                        flops=lambda cfg, T: 2 * cfg.dim * cfg.n_experts + cfg.experts_top_k
                        * channel_mixer_spec(dense_channel_mixer(cfg)).flops(cfg, T),
                        memory=lambda cfg, T: cfg.dim + cfg.n_experts + cfg.experts_top_k * (
                            channel_mixer_spec(dense_channel_mixer(cfg)).memory(cfg, T)
                            + 2 * cfg.dim + 7))  # per routed copy: its expert's, gathered in/out
class MoE(LoggingModule):
    def __init__(self, cfg, make_expert=None):
        super().__init__()
        make_expert = make_expert or make_ffn  # from the registry: the dense channel mixer
        C, E = cfg.dim, cfg.n_experts
        self.n_experts, self.top_k = E, cfg.experts_top_k
        self.router = nn.Linear(C, E, bias=False)
        self.experts = nn.ModuleList(make_expert(cfg) for _ in range(E))
        self.gates = Probe()  # (B, T, E) router probabilities
        self.dispatch = Probe()  # (B, T, E) 1 where a token goes to an expert
        self.aux_loss = torch.zeros(())  # last call's balancing loss, detached, for inspection
        self.aux_losses: list[torch.Tensor] | None = None  # set to [] by LM to collect them

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        flat = x.reshape(-1, C)  # (N, C)
        probs = torch.softmax(self.router(flat).float(), dim=-1)  # (N, E)
        top_p, top_i = probs.topk(self.top_k, dim=-1)  # (N, k)
        chosen = torch.zeros_like(probs).scatter(1, top_i, 1.0)  # (N, E)
        self.gates(probs.view(B, T, -1))  # (B, T, E)
        self.dispatch(chosen.view(B, T, -1))  # (B, T, E)
        out = torch.zeros_like(flat)  # (N, C)
        for e, expert in enumerate(self.experts):
            rows, slot = (top_i == e).nonzero(as_tuple=True)  # tokens routed to e, and which slot
            y = expert(flat[rows])  # (n_e, C)
            weight = top_p[rows, slot].unsqueeze(-1)  # (n_e, 1)
            out = out.index_add(0, rows, (y * weight).to(out.dtype))
        aux = load_balancing_loss(probs, chosen)
        self.aux_loss = aux.detach()
        if self.aux_losses is not None:
            self.aux_losses.append(aux)
        return out.view(B, T, C)  # (B, T, C)

    def extra_repr(self) -> str:
        return f"n_experts={self.n_experts}, top_k={self.top_k}"


__all__ = ["MoE", "load_balancing_loss"]
