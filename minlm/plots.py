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
def attention_probs(model, tokenizer, text: str, layer: int = 0) -> tuple[torch.Tensor, list[str]]:
    """Attention probabilities ``(H, T, T)`` of one layer for ``text`` (after BOS), and the
    token pieces that label both axes."""
    n_layers = model.config.n_layers
    if not 0 <= layer < n_layers:
        raise ValueError(f"layer={layer} is out of range: the model has layers 0..{n_layers - 1}")
    ids = ([tokenizer.bos_id] + tokenizer.encode(text))[: model.config.block_size]
    x = torch.tensor([ids], device=next(model.parameters()).device)
    name = f"blocks.{layer}.mixer.probs"
    probs = model.trace(x, capture=[name]).tensors[name][0].float().cpu()  # (H, T, T)
    return probs, [tokenizer.piece_text(i) for i in ids]


def attention_figure(model, tokenizer, text: str, layer: int = 0,
                     heads: int | list[int] | None = None, max_heads: int = 4) -> Figure:
    """Heatmaps of one layer's attention for one sentence: query tokens down, key tokens
    across, one panel per head (``heads``: one index, a list, or the first ``max_heads``),
    with a shared colour bar of the probability."""
    probs, pieces = attention_probs(model, tokenizer, text, layer)
    H, T = probs.shape[0], probs.shape[-1]
    chosen = ([heads] if isinstance(heads, int) else list(heads) if heads is not None
              else list(range(min(max_heads, H))))
    bad = [h for h in chosen if not 0 <= h < H]
    if bad:
        raise ValueError(f"heads={bad} are out of range: layer {layer} has heads 0..{H - 1}")
    labels = [p.replace("\n", "\\n") for p in pieces]
    side = max(3.6, 0.32 * T)  # room for a readable label per token
    fig = Figure(figsize=(side * len(chosen) + 1.2, side + 0.6))
    axes = fig.subplots(1, len(chosen), squeeze=False)[0]
    for ax, h in zip(axes, chosen):
        image = ax.imshow(probs[h].numpy(), cmap="viridis", vmin=0, vmax=1)
        ax.set_title(f"layer {layer}, head {h}", fontsize=11)
        ax.set_xticks(range(T), labels, rotation=90, fontsize=9)
        ax.set_yticks(range(T), labels if ax is axes[0] else [""] * T, fontsize=9)
        ax.set_xlabel("attends to (key)", fontsize=9)
    axes[0].set_ylabel("token (query)", fontsize=9)
    fig.colorbar(image, ax=list(axes), fraction=0.046 / len(chosen), pad=0.02,
                 label="attention probability")
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


def text_table(df):
    """A table of generated texts for a notebook: line breaks kept as line breaks (pandas' own
    HTML shows them as a literal ``\\n``) and text aligned left."""
    return df.style.set_properties(**{"white-space": "pre-wrap", "text-align": "left"})
