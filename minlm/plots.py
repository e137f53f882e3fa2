"""Figures the notebooks show: learning-rate schedules, attention patterns, compression bars.

Each function returns a matplotlib ``Figure`` (not drawn on a global pyplot state), so tests
can inspect it and notebooks display it.
"""

from __future__ import annotations

import torch
from matplotlib.figure import Figure

from minlm.config import TrainConfig


def lr_schedule_figure(*configs: TrainConfig, labels: list[str] | None = None) -> Figure:
    """Learning rate against step for one or more training configs."""
    from minlm.train import lr_at

    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    for i, cfg in enumerate(configs):
        steps = range(cfg.max_iters)
        label = labels[i] if labels else f"{cfg.schedule}, warmup {cfg.warmup_iters}"
        ax.plot(list(steps), [lr_at(s, cfg) for s in steps], label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("learning rate")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    return fig


@torch.no_grad()
def attention_figure(model, tokenizer, text: str, layer: int = 0, max_heads: int = 4) -> Figure:
    """Attention probabilities of one layer's heads for one sentence, tokens on both axes."""
    ids = [tokenizer.bos_id] + tokenizer.encode(text)
    ids = ids[: model.config.block_size]
    x = torch.tensor([ids], device=next(model.parameters()).device)
    t = model.trace(x, capture=[f"blocks.{layer}.mixer.probs"])
    probs = t.tensors[f"blocks.{layer}.mixer.probs"][0].float().cpu()  # (H, T, T)
    pieces = [tokenizer.id_to_piece(i) for i in ids]
    n = min(max_heads, probs.shape[0])
    fig = Figure(figsize=(3.2 * n, 3.4))
    for h in range(n):
        ax = fig.add_subplot(1, n, h + 1)
        ax.imshow(probs[h], cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {h}", fontsize=9)
        ax.set_xticks(range(len(pieces)), pieces, rotation=90, fontsize=6)
        ax.set_yticks(range(len(pieces)), pieces if h == 0 else [""] * len(pieces), fontsize=6)
    fig.tight_layout()
    return fig


def bar_figure(labels: list[str], values: list[float], ylabel: str, title: str = "") -> Figure:
    fig = Figure(figsize=(6, 3))
    ax = fig.add_subplot()
    bars = ax.bar(labels, values, color="#6a8fd0")
    ax.bar_label(bars, fmt="%.2f", fontsize=8)
    ax.set_ylabel(ylabel)
    ax.tick_params(axis="x", labelrotation=20, labelsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    return fig
