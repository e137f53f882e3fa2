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

# axis name -> (column of the loaded log, label); tokens first: the default, because runs
# with different batch sizes take different steps for the same data
X_AXES = {"tokens": ("tokens", "tokens seen"), "flops": ("flops", "training compute (FLOPs)"),
          "time": ("elapsed_s", "wall time (minutes)"), "step": ("step", "step")}


@dataclass
class _Loaded:
    """One run as a comparison reads it: its model config as the plain dict recorded (building
    it would import the experiment it names), its train config, its evaluations (with a FLOPs
    column: FLOPs per token x tokens) and its group (itself when it has none)."""

    path: Path
    model_cfg: dict
    train_cfg: object
    meta: dict
    log: object
    evals: object
    group: str

    @property
    def params(self) -> float:
        from minlm.runs import recorded_params

        n = recorded_params(self.model_cfg, self.meta)
        return math.nan if n is None else n


def _load_runs(runs: Sequence) -> list[_Loaded]:
    from minlm.runs import read_log, read_record
    from minlm.seeds import resolve_runs

    if isinstance(runs, (str, os.PathLike)) or not runs:
        raise ValueError("compare() takes a list of one or more runs (names, folders or seed "
                         "groups)")
    out = []
    for run_dir in resolve_runs(runs):
        model_cfg, train_cfg, meta = read_record(run_dir)  # imports no experiment code
        log = read_log(run_dir)
        if len(log):
            log["flops"] = _flops_per_token(model_cfg, meta) * log["tokens"].astype(float)
        evals = log.dropna(subset=["val_bpb"]) if len(log) else log
        out.append(_Loaded(run_dir, model_cfg, train_cfg, meta, log, evals,
                           train_cfg.group or run_dir.name))
    return out


def _flops_per_token(model_data: dict, meta: dict) -> float:
    """What the run recorded; else counted from its config when that imports no code (no
    experiment); else NaN (the run has no FLOPs axis)."""
    from minlm.config import ModelConfig
    from minlm.flops import flops_per_token

    if meta.get("flops_per_token"):
        return float(meta["flops_per_token"])
    if model_data.get("experiment"):
        return math.nan
    return float(flops_per_token(ModelConfig.from_dict(model_data)))


def _grouped(loaded: list[_Loaded]) -> dict[str, list[_Loaded]]:
    groups: dict[str, list[_Loaded]] = {}
    for r in loaded:  # in the order given
        groups.setdefault(r.group, []).append(r)
    return groups


def differences_note(loaded: Sequence, x: str = "tokens") -> str:
    """One line saying in what the runs differ that the x axis or the metric must absorb
    (batch size, vocabulary, context), and how the comparison absorbs it; "" when nothing."""
    parts = []
    for what, get in (("batch size", lambda r: r.train_cfg.batch_size
                       * r.train_cfg.grad_accum_steps),
                      ("vocabulary", lambda r: r.model_cfg.get("vocab_size")),
                      ("context", lambda r: r.model_cfg.get("block_size"))):
        values = sorted({get(r) for r in loaded})
        if len(values) > 1:
            parts.append(f"{what} ({', '.join(map(str, values))})")
    if not parts:
        return ""
    how = {"step": "the x axis is steps, which do not compare across batch sizes and "
                   "contexts (use tokens)",
           "tokens": "the x axis is tokens seen", "flops": "the x axis is training FLOPs",
           "time": "the x axis is wall time"}[x]
    return f"note: these runs differ in {', '.join(parts)}; {how}, and bits per byte compare " \
           "across tokenizers"


def compare(runs: Sequence, x: str = "tokens") -> tuple[pd.DataFrame, Figure]:
    """Final figures of several runs (one row each, in the order given) and a figure of their
    validation bits per byte against ``x``: "tokens" (the default), "flops" (training FLOPs,
    ``minlm.flops``), "time" (wall clock) or "step".

    ``runs`` holds run names (under ``trained_models/`` or ``$MINLM_RUNS_DIR``), run folder
    paths, loaded ``Run`` objects, or seed groups (``train seeds=N``: a group's name, or its
    member runs): a group is one row (``val_bpb`` the mean over its seeds, ``val_bpb_sd`` their
    standard deviation) and one curve, its mean with a band of ± one standard deviation over
    the seeds, interpolated to common x values. Bits per byte put runs with different
    tokenizers on one scale. ``table.attrs["note"]`` holds one line when the runs differ in
    batch size, vocabulary or context (also the figure's title); ``judge`` says whether the
    differences between groups exceed their seed spread.
    """
    import pandas as pd
    from matplotlib.figure import Figure

    if x not in X_AXES:
        raise ValueError(f"x={x!r} is invalid: use one of {', '.join(X_AXES)}")
    loaded = _load_runs(runs)
    column, label = X_AXES[x]
    scale = 1 / 60 if x == "time" else 1
    rows = []
    fig = Figure(figsize=(7, 4))
    ax = fig.add_subplot()
    for name, members in _grouped(loaded).items():
        finals = []
        for r in members:
            log, evals = r.log, r.evals
            trains = log.dropna(subset=["train_loss"]) if len(log) else log
            last = log.iloc[-1] if len(log) else None
            finals.append({
                "params": r.params,
                "steps": int(last["step"]) if last is not None else 0,
                "tokens": int(last["tokens"]) if last is not None else 0,
                "minutes": float(last["elapsed_s"]) / 60 if last is not None else math.nan,
                "train_loss": float(trains["train_loss"].iloc[-1]) if len(trains) else math.nan,
                "val_loss": float(evals["val_loss"].iloc[-1]) if len(evals) else math.nan,
                "val_bpb": float(evals["val_bpb"].iloc[-1]) if len(evals) else math.nan,
                "best_val_bpb": float(evals["val_bpb"].min()) if len(evals) else math.nan,
            })
        mean = {k: float(np.mean([f[k] for f in finals])) for k in finals[0]}
        first = members[0]
        bpbs = [f["val_bpb"] for f in finals]
        rows.append({
            "run": name, "seeds": len(members), "preset": first.train_cfg.preset,
            "params": int(mean["params"]) if mean["params"] == mean["params"] else None,
            "vocab_size": first.model_cfg.get("vocab_size"),
            "batch_size": first.train_cfg.batch_size * first.train_cfg.grad_accum_steps,
            "block_size": first.model_cfg.get("block_size"),
            "steps": int(mean["steps"]), "tokens": int(mean["tokens"]),
            "minutes": round(mean["minutes"], 2),
            **{k: mean[k] for k in ("train_loss", "val_loss", "val_bpb")},
            "val_bpb_sd": float(np.std(bpbs, ddof=1)) if len(members) > 1 else math.nan,
            "best_val_bpb": mean["best_val_bpb"],
        })
        curves = [r.evals for r in members if len(r.evals)]
        if len(members) == 1 and curves:
            ax.plot(curves[0][column] * scale, curves[0]["val_bpb"], marker="o", markersize=3,
                    label=name)
        elif curves:
            grid = np.unique(np.concatenate([c[column].to_numpy(float) for c in curves]))
            grid = grid[grid <= min(c[column].max() for c in curves)]  # where every seed is
            ys = np.stack([_curve(c, column, grid) for c in curves])  # (seeds, points)
            mid, sd = ys.mean(axis=0), ys.std(axis=0, ddof=1)
            line, = ax.plot(grid * scale, mid, label=f"{name} (mean of {len(curves)} seeds)")
            ax.fill_between(grid * scale, mid - sd, mid + sd, color=line.get_color(), alpha=0.25,
                            linewidth=0, label=f"{name} ± 1 sd over seeds")
    note = differences_note(loaded, x)
    ax.set_xlabel(label)
    ax.set_ylabel("validation bits per byte")
    ax.grid(alpha=0.3)
    if note:
        ax.set_title(note.removeprefix("note: "), fontsize=7, wrap=True)
    if any(r["best_val_bpb"] == r["best_val_bpb"] for r in rows):  # at least one curve
        ax.legend(fontsize=8)
    fig.tight_layout()
    table = pd.DataFrame(rows)
    table.attrs["note"] = note
    return table, fig


def _curve(evals, column: str, at):
    from minlm.seeds import curve_at

    return curve_at(evals[column].to_numpy(float), evals["val_bpb"].to_numpy(float), at)


def judge(runs: Sequence, at_tokens: float | None = None) -> pd.DataFrame:
    """Every pair of groups among ``runs`` (as ``compare`` takes them) judged at equal tokens:
    each run's val bits per byte interpolated to ``at_tokens`` (default: the most tokens every
    run reached), then Welch's t-test over the seeds (``minlm.seeds.verdict``). One row per
    pair with the means, the difference, its standard error, p and the verdict in words."""
    import pandas as pd

    from minlm.seeds import verdict

    groups = _grouped(_load_runs(runs))
    bare = [r.path.name for m in groups.values() for r in m if not len(r.evals)]
    if bare:
        raise ValueError(f"run {bare[0]} has no evaluation in its log.csv yet; judge compares "
                         "runs at evaluated points (let it reach eval_interval, or leave it out)")
    if len(groups) < 2:
        raise ValueError(f"judge needs at least two groups of runs to compare; got "
                         f"{', '.join(groups)}")
    reached = min(float(r.evals["tokens"].max()) for m in groups.values() for r in m)
    at = reached if at_tokens is None else float(at_tokens)
    if at > reached:
        raise ValueError(f"at_tokens={at_tokens} is beyond the {reached:,.0f} tokens every run "
                         "reached; use at most that")
    values = {n: [float(_curve(r.evals, "tokens", [at])[0]) for r in m]
              for n, m in groups.items()}
    rows = []
    for a, b in itertools.combinations(groups, 2):
        v = verdict(values[a], values[b], (a, b), at)
        rows.append({"a": a, "b": b, "tokens": int(at), "seeds_a": v.n_a, "seeds_b": v.n_b,
                     "bpb_a": v.mean_a, "bpb_b": v.mean_b, "diff": v.diff, "stderr": v.stderr,
                     "p": v.p, "statistic": v.statistic, "verdict": v.text})
    return pd.DataFrame(rows)


def side_by_side(runs: Sequence, prompts: Sequence[str], max_new_tokens: int = 60,
                 device: str = "cpu", trust_experiment: bool = False,
                 **sampling) -> pd.DataFrame:
    """Completions of the same prompts by several runs: one row per prompt, one column per
    run. ``sampling`` (temperature, top_k, top_p, min_p, repetition_penalty, seed) is the same
    for every run; set ``seed`` for a fair, repeatable comparison. ``trust_experiment``: as
    ``load_run``'s."""
    import pandas as pd

    from minlm.generate import generate_batch
    from minlm.runs import load_run

    if isinstance(prompts, str):
        prompts = [prompts]
    table = {}
    for run in runs:
        loaded = (run if hasattr(run, "model")
                  else load_run(run, device=device, trust_experiment=trust_experiment))
        table[loaded.name] = generate_batch(loaded.model, loaded.tokenizer, list(prompts),
                                            max_new_tokens, **sampling)
    return pd.DataFrame(table, index=pd.Index(list(prompts), name="prompt"))
