"""Loss, perplexity, bits per byte and top-k accuracy over whole held-out texts, and the
comparison of runs: a table of final figures, curves of validation bits per byte, and
side-by-side completions.

Bits per byte are the numbers that compare across tokenizers.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # imported where used: the training loop imports this module
    import pandas as pd
    from matplotlib.figure import Figure


def bits_per_byte(loss_nats: float, n_tokens: int, n_bytes: int) -> float:
    """Mean loss per token (nats) -> bits per UTF-8 byte of the same text.

    Total information is loss * tokens nats; divide by ln 2 for bits and by the byte count.
    A 512-token and a 4096-token model can then stand on one plot.
    """
    if n_bytes <= 0:
        raise ValueError(f"n_bytes={n_bytes} must be positive")
    return loss_nats * n_tokens / n_bytes / math.log(2)


def fixed_windows(tokens: np.ndarray, n_windows: int, block_size: int) -> np.ndarray:
    """Start offsets of ``n_windows`` windows spread evenly over a split: the same every time."""
    last = len(tokens) - block_size - 1
    if last < 0:
        raise ValueError(f"the split holds {len(tokens)} tokens, fewer than block_size+1="
                         f"{block_size + 1}; use a smaller block_size or more data")
    return np.linspace(0, last, num=max(1, n_windows)).astype(np.int64)


@torch.no_grad()
def estimate_loss(model, tokens: np.ndarray, block_size: int, batch_size: int, n_batches: int,
                  device="cpu", autocast=None) -> float:
    """Mean loss over a fixed set of evenly spaced windows (eval mode, restored afterwards)."""
    starts = fixed_windows(tokens, n_batches * batch_size, block_size)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for i in range(0, len(starts), batch_size):
            chunk = starts[i:i + batch_size]
            x = torch.from_numpy(np.stack([tokens[s:s + block_size] for s in chunk]).astype(np.int64))
            y = torch.from_numpy(np.stack([tokens[s + 1:s + 1 + block_size] for s in chunk]).astype(np.int64))
            with autocast() if autocast else contextlib.nullcontext():
                _, loss = model(x.to(device), y.to(device))
            total += loss.item() * len(chunk)
            count += len(chunk)
    finally:
        model.train(was_training)
    return total / count


# --- whole-text evaluation ---------------------------------------------------------------

TOPK = (1, 5, 10)


@dataclass
class EvalResult:
    """Figures over every token of a held-out text (each token after the first is a target
    exactly once, in consecutive windows of the model's context)."""

    loss: float  # mean cross-entropy per target, nats
    perplexity: float  # exp(loss)
    bits_per_byte: float  # nan when the byte count is unknown
    accuracy: dict[int, float]  # k -> share of targets among the k most likely tokens
    targets: int
    n_bytes: int
    documents: int = 0

    def lines(self) -> list[str]:
        """One labelled line per figure, as ``python -m minlm eval`` prints them."""
        out = [f"validation loss: {self.loss:.4f} nats/token",
               f"perplexity: {self.perplexity:.3f}",
               f"bits per byte: {self.bits_per_byte:.4f}"]
        out += [f"top-{k} accuracy: {acc:.4f}" for k, acc in self.accuracy.items()]
        where = f" in {self.documents:,} documents" if self.documents else ""
        out.append(f"evaluated: {self.targets:,} target tokens, {self.n_bytes:,} bytes{where}")
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def evaluate_tokens(model, tokens, n_bytes: int | None = None, block_size: int | None = None,
                    batch_size: int = 16, ks: Sequence[int] = TOPK) -> EvalResult:
    """Loss, perplexity, bits per byte (given the text's UTF-8 byte count) and top-k
    teacher-forcing accuracy over a whole token stream, in batches of consecutive windows.

    ``tokens`` is a 1-D array or tensor of ids; ``block_size`` defaults to the model's context.
    Eval mode and no gradients for the duration; the model's mode is restored afterwards.
    """
    from minlm.data import iter_eval_batches

    tokens = np.asarray(tokens.cpu() if isinstance(tokens, torch.Tensor) else tokens)
    if tokens.ndim != 1 or len(tokens) < 2:
        raise ValueError(f"need a 1-D stream of at least 2 token ids, got shape {tokens.shape}")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    ks = sorted({int(k) for k in ks})
    if not ks or ks[0] < 1:
        raise ValueError(f"ks={ks} must be positive integers such as (1, 5, 10)")
    T = min(block_size or model.config.block_size, len(tokens) - 1)
    device = next(model.parameters()).device
    total, hits, count = 0.0, dict.fromkeys(ks, 0), 0
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            for x, y in iter_eval_batches(tokens, batch_size, T, device=device):
                logits, _ = model(x)
                V = logits.shape[-1]
                flat, targets = logits.reshape(-1, V).float(), y.reshape(-1)  # (B*T, V), (B*T,)
                total += F.cross_entropy(flat, targets, reduction="sum").item()
                top = flat.topk(min(ks[-1], V), dim=-1).indices  # (B*T, kmax)
                found = (top == targets[:, None]).cumsum(dim=-1) > 0  # within the first j+1
                for k in ks:
                    hits[k] += int(found[:, min(k, V) - 1].sum())
                count += targets.numel()
    finally:
        model.train(was_training)
    loss = total / count
    bpb = bits_per_byte(loss, count, n_bytes) if n_bytes else math.nan
    return EvalResult(loss=loss, perplexity=math.exp(min(loss, 700.0)), bits_per_byte=bpb,
                      accuracy={k: hits[k] / count for k in ks}, targets=count,
                      n_bytes=n_bytes or 0)


def topk_accuracy(model, tokens, ks: Sequence[int] = TOPK, block_size: int | None = None,
                  batch_size: int = 16) -> dict[int, float]:
    """Teacher-forcing accuracy: share of next tokens among the model's k most likely."""
    return evaluate_tokens(model, tokens, None, block_size, batch_size, ks).accuracy


def evaluate_text(model, tokenizer, documents: str | Iterable[str], block_size: int | None = None,
                  batch_size: int = 16, ks: Sequence[int] = TOPK) -> EvalResult:
    """``evaluate_tokens`` over documents tokenized as training does (BOS + text + EOS each);
    bits per byte divide by the documents' UTF-8 bytes, as the training log's ``val_bpb``."""
    docs = [documents] if isinstance(documents, str) else list(documents)
    if not docs:
        raise ValueError("no documents to evaluate")
    ids = [i for d in docs for i in tokenizer.encode(d, bos=True, eos=True)]
    n_bytes = sum(len(d.encode("utf-8")) for d in docs)
    result = evaluate_tokens(model, np.asarray(ids, dtype=np.int64), n_bytes, block_size,
                             batch_size, ks)
    result.documents = len(docs)
    return result


def evaluate_file(model, tokenizer, path: str | os.PathLike, max_docs: int = 0,
                  block_size: int | None = None, batch_size: int = 16,
                  ks: Sequence[int] = TOPK) -> EvalResult:
    """``evaluate_text`` over a whole file's documents (as ``minlm.data.read_documents`` splits
    them); ``max_docs`` > 0 keeps only the first documents."""
    from minlm.data import read_documents

    docs = read_documents(path)
    if max_docs:
        docs = itertools.islice(docs, max_docs)
    return evaluate_text(model, tokenizer, docs, block_size, batch_size, ks)


@torch.no_grad()
def score_continuations(model, rows: Sequence[tuple[Sequence[int], int]], batch_size: int = 16,
                        pad_id: int = 0) -> list[tuple[float, bool]]:
    """For each (ids, n): the summed log-probability (nats) of the last ``n`` ids given the ones
    before them, and whether greedy decoding would have produced exactly those ``n`` ids.

    What lm-evaluation-harness asks of a model (``minlm.harness``). Rows of up to
    ``block_size + 1`` ids run in right-padded batches of similar lengths (a causal model's
    real positions never see the padding after them); eval mode for the duration.
    """
    limit = model.config.block_size + 1
    for k, (ids, n) in enumerate(rows):
        if not 1 <= n < len(ids) or len(ids) > limit:
            raise ValueError(f"row {k}: {len(ids)} ids scoring the last {n}; need "
                             f"1 <= n < len(ids) <= block_size + 1 = {limit}")
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda k: -len(rows[k][0]))
    out: list[tuple[float, bool]] = [(0.0, False)] * len(rows)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            chunk = order[start:start + batch_size]
            T = len(rows[chunk[0]][0]) - 1  # the longest row of the chunk, as inputs
            x = torch.full((len(chunk), T), pad_id, dtype=torch.long)  # (B, T)
            for b, k in enumerate(chunk):
                ids = rows[k][0]
                x[b, :len(ids) - 1] = torch.tensor(ids[:-1], dtype=torch.long)
            logits, _ = model(x.to(device))
            logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
            for b, k in enumerate(chunk):
                ids, n = rows[k]
                at = slice(len(ids) - 1 - n, len(ids) - 1)  # positions predicting the last n
                want = torch.tensor(ids[-n:], dtype=torch.long, device=logp.device)  # (n,)
                picked = logp[b, at].gather(-1, want[:, None]).squeeze(-1)  # (n,)
                greedy = bool((logp[b, at].argmax(dim=-1) == want).all())
                out[k] = (float(picked.sum()), greedy)
    finally:
        model.train(was_training)
    return out


# --- comparing runs ----------------------------------------------------------------------

X_AXES = {"step": ("step", "step"), "tokens": ("tokens", "tokens seen"),
          "time": ("elapsed_s", "wall time (minutes)")}


def _run_dir(run) -> Path:
    from minlm.runs import resolve_run_dir

    return Path(run.path) if hasattr(run, "path") else resolve_run_dir(run)


def compare(runs: Sequence, x: str = "step") -> tuple[pd.DataFrame, Figure]:
    """Final figures of several runs (one row each, in the order given) and a figure of their
    validation bits per byte against ``x``: "step", "tokens" or "time" (wall clock).

    ``runs`` holds run names (under ``trained_models/`` or ``$MINLM_RUNS_DIR``), run folder
    paths or loaded ``Run`` objects. Bits per byte put runs with different tokenizers on one
    scale.
    """
    import pandas as pd
    from matplotlib.figure import Figure

    from minlm.model import LM
    from minlm.runs import read_configs, read_log

    if x not in X_AXES:
        raise ValueError(f"x={x!r} is invalid: use one of {', '.join(X_AXES)}")
    if isinstance(runs, (str, os.PathLike)) or not runs:
        raise ValueError("compare() takes a list of one or more runs (names or folders)")
    column, label = X_AXES[x]
    rows = []
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for run in runs:
        run_dir = _run_dir(run)
        model_cfg, train_cfg, meta = read_configs(run_dir)
        log = read_log(run_dir)
        evals = log.dropna(subset=["val_bpb"]) if len(log) else log
        trains = log.dropna(subset=["train_loss"]) if len(log) else log
        last = log.iloc[-1] if len(log) else None
        rows.append({
            "run": run_dir.name,
            "preset": train_cfg.preset,
            "params": meta.get("params") or LM.count_params(model_cfg),
            "vocab_size": model_cfg.vocab_size,
            "steps": int(last["step"]) if last is not None else 0,
            "tokens": int(last["tokens"]) if last is not None else 0,
            "minutes": round(float(last["elapsed_s"]) / 60, 2) if last is not None else math.nan,
            "train_loss": float(trains["train_loss"].iloc[-1]) if len(trains) else math.nan,
            "val_loss": float(evals["val_loss"].iloc[-1]) if len(evals) else math.nan,
            "val_bpb": float(evals["val_bpb"].iloc[-1]) if len(evals) else math.nan,
            "best_val_bpb": float(evals["val_bpb"].min()) if len(evals) else math.nan,
        })
        if len(evals):
            xs = evals[column] / 60 if x == "time" else evals[column]
            ax.plot(xs, evals["val_bpb"], marker="o", markersize=3, label=run_dir.name)
    ax.set_xlabel(label)
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    if any(r["best_val_bpb"] == r["best_val_bpb"] for r in rows):  # at least one curve
        ax.legend(fontsize=8)
    fig.tight_layout()
    return pd.DataFrame(rows), fig


def side_by_side(runs: Sequence, prompts: Sequence[str], max_new_tokens: int = 60,
                 device: str = "cpu", **sampling) -> pd.DataFrame:
    """Completions of the same prompts by several runs: one row per prompt, one column per
    run. ``sampling`` (temperature, top_k, top_p, min_p, repetition_penalty, seed) is the same
    for every run; set ``seed`` for a fair, repeatable comparison."""
    import pandas as pd

    from minlm.generate import generate_batch
    from minlm.runs import load_run

    if isinstance(prompts, str):
        prompts = [prompts]
    table = {}
    for run in runs:
        loaded = run if hasattr(run, "model") else load_run(run, device=device)
        table[loaded.name] = generate_batch(loaded.model, loaded.tokenizer, list(prompts),
                                            max_new_tokens, **sampling)
    return pd.DataFrame(table, index=pd.Index(list(prompts), name="prompt"))
