"""Hyperparameter search under a memory budget, with successive halving.

Every candidate is a dict of overrides on a base ``ModelConfig``/``TrainConfig`` (any field of
either). Before a candidate trains, one real training step at its batch measures its peak
memory; over the budget, it is skipped with the figures. Each trial that trains is a normal run
folder. With successive halving, all trials first train to the first rung (a fraction of
``max_iters``), the best 1/eta of them continue (exact resume from their checkpoint, so the
learning-rate schedule is the one a straight run would follow) and the rest are cut; a trial
whose memory goes over the budget during training is stopped and marked.

    results = search(grid(dim=[64, 128], n_layers=[2, 4], lr=[1e-3, 3e-3]),
                     ModelConfig.from_preset("llama-1m"), TrainConfig(max_iters=600),
                     memory_budget="2GB", eta=3)
    results.table        # one row per trial, best val bits per byte first
    results.figure()     # val bits per byte against parameters and against compute
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from minlm.config import ModelConfig, TrainConfig
from minlm.flops import flops_per_token
from minlm.loss import chunk_rows

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
_UNITS = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


# --- candidates ----------------------------------------------------------------------------

def grid(**axes: Sequence) -> list[dict]:
    """Every combination of the values given per field: ``grid(dim=[64, 128], lr=[1e-3])``."""
    _check_fields(axes)
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def random_candidates(n: int, seed: int = 0, **space) -> list[dict]:
    """``n`` random candidates: a list/tuple of values is a choice; ``("log", lo, hi)`` or
    ``("uniform", lo, hi)`` a continuous range (ints stay ints when both ends are ints)."""
    _check_fields(space)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cand = {}
        for name, spec in space.items():
            if isinstance(spec, tuple) and spec and spec[0] in ("log", "uniform"):
                kind, lo, hi = spec
                v = (math.exp(rng.uniform(math.log(lo), math.log(hi))) if kind == "log"
                     else rng.uniform(lo, hi))
                cand[name] = round(v) if isinstance(lo, int) and isinstance(hi, int) else v
            else:
                cand[name] = rng.choice(list(spec))
        out.append(cand)
    return out


def _check_fields(fields: dict) -> None:
    unknown = sorted(set(fields) - _MODEL_FIELDS - _TRAIN_FIELDS)
    if unknown:
        raise ValueError(f"unknown config field(s) to search: {', '.join(unknown)}; any field of "
                         "ModelConfig or TrainConfig can be searched")


def split_overrides(overrides: dict, model_cfg: ModelConfig,
                    train_cfg: TrainConfig) -> tuple[ModelConfig, TrainConfig]:
    """The base configs with a candidate's overrides applied to whichever config owns each."""
    _check_fields(overrides)
    m = {k: v for k, v in overrides.items() if k in _MODEL_FIELDS}
    t = {k: v for k, v in overrides.items() if k in _TRAIN_FIELDS and k not in _MODEL_FIELDS}
    return model_cfg.replace(**m), train_cfg.replace(**t)


def parse_bytes(budget: int | float | str | None) -> int | None:
    """``"512MB"``, ``"2 GiB"``, ``1e9`` -> bytes (powers of 1024 for every unit)."""
    if budget is None or isinstance(budget, (int, float)):
        return None if budget is None else int(budget)
    m = re.fullmatch(r"\s*([0-9.]+)\s*([a-zA-Z]*)\s*", str(budget))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"memory budget {budget!r} is not a size such as '512MB' or '2GB'")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


# --- memory --------------------------------------------------------------------------------

def measure_step_memory(model_cfg: ModelConfig, train_cfg: TrainConfig,
                        device: str | torch.device = "cpu") -> int:
    """Peak bytes of one real training step (forward, backward, optimizer) at the run's batch.

    On CUDA, the allocator's peak. On the CPU, where no allocator keeps a peak, it adds what
    coexists at the top of a step: weights, gradients and optimizer state as they are after the
    step, plus every distinct tensor the forward saved for backward (counted by storage, so
    views and weights are not counted twice) and the logits.
    """
    from minlm.model import LM
    from minlm.optim import make_optimizer
    from minlm.train import use_bf16

    device = torch.device(device)
    B, T = train_cfg.batch_size // max(1, train_cfg.grad_accum_steps) or 1, model_cfg.block_size
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, model_cfg.vocab_size, (B, T), generator=gen).to(device)
    autocast = (torch.autocast(device.type, dtype=torch.bfloat16)
                if use_bf16(train_cfg.precision, device) else torch.autocast(device.type, enabled=False))
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    model = LM(model_cfg).to(device)
    optimizer = make_optimizer(model, train_cfg, device)
    param_ptrs = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in param_ptrs:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), autocast:
        _, loss = model(x, x, return_logits=False)  # as the trainer runs it
    loss.backward()
    optimizer.step()
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    nbytes = lambda ts: sum(t.numel() * t.element_size() for t in ts)  # noqa: E731
    weights = nbytes(model.parameters())
    grads = nbytes(p.grad for p in model.parameters() if p.grad is not None)
    state = nbytes(v for s in optimizer.state.values() for v in s.values()
                   if isinstance(v, torch.Tensor))
    V = model_cfg.vocab_size  # the fused loss holds one chunk of fp32 logits at a time
    logits_chunk = min(x.numel(), chunk_rows(V)) * V * 4
    return weights + grads + state + sum(saved.values()) + logits_chunk


def memory_in_use(device: torch.device) -> int:
    """Bytes this process holds now: allocated GPU memory, or resident set size on the CPU."""
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        import resource  # no /proc (macOS): the peak is the best figure there is

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


# --- trials --------------------------------------------------------------------------------

@dataclass
class Trial:
    name: str
    overrides: dict
    params: int = 0
    peak_memory: int = 0  # bytes of one measured training step
    status: str = "pending"  # pending, trained, cut, skipped, over memory, failed
    reason: str = ""
    steps: int = 0
    tokens: int = 0
    compute: float = 0.0  # training FLOPs so far
    val_bpb: float = math.nan
    run_dir: str = ""
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val bpb)


@dataclass
class SearchResult:
    trials: list[Trial]

    @property
    def table(self):
        """One row per trial, best val bits per byte first (trials without one last)."""
        import pandas as pd

        rows = []
        for t in self.trials:
            rows.append({"trial": t.name, **t.overrides, "params": t.params,
                         "peak_memory_mb": round(t.peak_memory / 2**20, 1), "steps": t.steps,
                         "tokens": t.tokens, "compute_flops": t.compute, "val_bpb": t.val_bpb,
                         "status": t.status, "reason": t.reason, "run_dir": t.run_dir})
        df = pd.DataFrame(rows)
        return df.sort_values("val_bpb", na_position="last", kind="stable").reset_index(drop=True)

    @property
    def best(self) -> Trial | None:
        done = [t for t in self.trials if t.status == "trained"]
        return min(done, key=lambda t: t.val_bpb) if done else None

    def figure(self):
        """Val bits per byte against parameters and against training compute; cut trials
        hollow, the best one starred."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(10, 4))
        axes = fig.subplots(1, 2, sharey=True)
        shown = [t for t in self.trials if t.val_bpb == t.val_bpb]
        best = self.best
        for ax, attr, label in ((axes[0], "params", "parameters"),
                                (axes[1], "compute", "training compute (FLOPs)")):
            for status, style in (("trained", dict(marker="o")),
                                  ("cut", dict(marker="o", facecolors="none", edgecolors="C1")),
                                  ("over memory", dict(marker="x", color="C3"))):
                pts = [t for t in shown if t.status == status]
                if pts:
                    ax.scatter([getattr(t, attr) for t in pts], [t.val_bpb for t in pts],
                               label=status, **style)
            if best is not None:
                ax.scatter([getattr(best, attr)], [best.val_bpb], marker="*", s=200, color="C2",
                           label=f"best: {best.name}")
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("validation bits per byte")
        axes[0].legend(fontsize=8)
        fig.tight_layout()
        return fig


def _rungs(max_iters: int, eval_interval: int, eta: int, n_rungs: int) -> list[int]:
    """Steps at which trials are compared: max_iters / eta^k, on evaluation steps."""
    out = []
    for k in range(n_rungs - 1, 0, -1):  # the last rung is max_iters itself
        step = max(eval_interval, round(max_iters / eta**k / eval_interval) * eval_interval)
        if step < max_iters and (not out or step > out[-1]):
            out.append(step)
    return out + [max_iters]


def steps_for_compute(model_cfg: ModelConfig, train_cfg: TrainConfig, compute: float) -> int:
    """Optimizer steps that spend ``compute`` training FLOPs (at least one evaluation interval)."""
    per_step = (flops_per_token(model_cfg) * train_cfg.batch_size * model_cfg.block_size
                * train_cfg.grad_accum_steps)
    return max(train_cfg.eval_interval, int(compute // per_step))


def search(candidates: Sequence[dict], model_cfg: ModelConfig, train_cfg: TrainConfig,
           memory_budget: int | float | str | None = None, eta: int = 3, n_rungs: int = 3,
           name: str = "search", device: str | torch.device | None = None,
           callbacks: Sequence[Callable[[Trial, dict], None]] = (),
           compute_budget: float | None = None, max_params: int | None = None,
           verbose: bool = True) -> SearchResult:
    """Train each candidate (dicts of config overrides) as a run under
    ``train_cfg.out_dir/<name>/``, skipping those whose measured step memory exceeds
    ``memory_budget`` (bytes or "2GB"), and cutting all but the best 1/``eta`` at each of
    ``n_rungs`` rungs (``n_rungs=1``: no cutting). Returns the trials, best first in ``.table``.

    Every trial trains for ``train_cfg.max_iters`` steps, which favours the larger models. With
    ``compute_budget`` (training FLOPs per trial) each trial instead gets the steps that budget
    buys, so a model twice the size trains half as long, schedule included, and the rungs
    compare trials at equal compute: the question a fixed amount of hardware time asks.
    ``max_params`` skips (with the reason) candidates with more parameters.
    """
    from tqdm.auto import tqdm

    from minlm.memory import estimate_params, estimate_training_bytes
    from minlm.train import resolve_device

    if not candidates:
        raise ValueError("no candidates to search; build them with grid(...) or "
                         "random_candidates(...)")
    if eta < 2 or n_rungs < 1:
        raise ValueError(f"eta={eta} must be >= 2 and n_rungs={n_rungs} >= 1")
    budget = parse_bytes(memory_budget)
    dev = resolve_device(str(device) if device is not None else train_cfg.device)
    say = tqdm.write if verbose else (lambda *a, **k: None)
    out_dir = Path(train_cfg.out_dir) / name
    base_train = train_cfg.replace(out_dir=str(out_dir), verbose=False, resume=False)

    trials: list[Trial] = []
    configs: dict[str, tuple[ModelConfig, TrainConfig]] = {}
    for i, overrides in enumerate(candidates):
        label = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in overrides.items())
        t = Trial(name=f"trial{i:02d}-{label}".replace("/", "_")[:100], overrides=dict(overrides))
        trials.append(t)
        try:
            m, tc = split_overrides(overrides, model_cfg, base_train)
            t.params = estimate_params(m)
            if max_params is not None and t.params > max_params:
                t.status = "skipped"
                t.reason = f"{t.params:,} parameters, over the limit of {max_params:,}"
                say(f"{t.name}: skipped; {t.reason}")
                continue
            estimate = estimate_training_bytes(m, tc.batch_size)
            if budget is not None and estimate > 2 * budget:  # far over: do not even try it
                t.status, t.peak_memory = "skipped", estimate
                t.reason = (f"estimated {estimate / 2**20:,.1f} MiB for one training step, "
                            f"far over the budget of {budget / 2**20:,.1f} MiB")
                say(f"{t.name}: skipped; {t.reason}")
                continue
            t.peak_memory = measure_step_memory(m, tc, dev)
        except (ValueError, TypeError) as e:
            t.status, t.reason = "failed", f"invalid config: {e}"
            continue
        except (RuntimeError, MemoryError) as e:
            t.status, t.reason = "skipped", f"one training step failed: {str(e)[:200]}"
            continue
        if budget is not None and t.peak_memory > budget:
            t.status = "skipped"
            t.reason = (f"one training step needs {t.peak_memory / 2**20:,.1f} MiB, over the "
                        f"budget of {budget / 2**20:,.1f} MiB")
            say(f"{t.name}: skipped; {t.reason}")
            continue
        if compute_budget:
            tc = tc.replace(max_iters=steps_for_compute(m, tc, compute_budget))
        configs[t.name] = (m, tc.replace(run_name=t.name))

    active = [t for t in trials if t.name in configs]
    rungs = {n: _rungs(tc.max_iters, tc.eval_interval, eta, n_rungs) for n, (_, tc) in configs.items()}
    n_rounds = max((len(r) for r in rungs.values()), default=0)
    for r in range(n_rounds):
        bar = tqdm(active, desc=f"rung {r + 1}/{n_rounds}", disable=not verbose)
        for t in bar:
            m, tc = configs[t.name]
            rung = rungs[t.name][min(r, len(rungs[t.name]) - 1)]  # short lists: stay at the end
            if t.steps < rung:
                _train_to(t, m, tc.replace(resume=r > 0, overwrite=r == 0), rung, dev, budget,
                          callbacks)
        ranked = sorted((t for t in active if t.status == "trained"), key=lambda t: t.val_bpb)
        if r == n_rounds - 1 or not ranked:
            break
        keep = ranked[:max(1, math.ceil(len(ranked) / eta))]
        for t in ranked[len(keep):]:
            t.status = "cut"
            t.reason = (f"val bpb {t.val_bpb:.4f} at step {t.steps}, behind the best "
                        f"{len(keep)} (best {keep[0].val_bpb:.4f})")
            say(f"{t.name}: cut; {t.reason}")
        active = keep
    return SearchResult(trials)


def _train_to(t: Trial, model_cfg: ModelConfig, train_cfg: TrainConfig, rung: int,
              device: torch.device, budget: int | None, callbacks) -> None:
    """Train (or resume) one trial until step ``rung``; update its figures and status."""
    from minlm.train import StopFlag, train

    stop = StopFlag()
    baseline = memory_in_use(device)
    per_token = flops_per_token(model_cfg)

    def watch(row: dict) -> None:
        if row.get("val_bpb") is not None:
            t.curve.append((row["step"], row["val_bpb"]))
            t.val_bpb = row["val_bpb"]
        t.steps, t.tokens = row["step"], row["tokens"]
        t.compute = per_token * row["tokens"]
        used = memory_in_use(device) - baseline
        if budget is not None and used > budget:
            t.status = "over memory"
            t.reason = (f"used {used / 2**20:,.1f} MiB at step {row['step']}, over the budget "
                        f"of {budget / 2**20:,.1f} MiB")
            stop.set(t.reason)
        elif row["step"] >= rung and row.get("val_bpb") is not None:
            stop.set(f"search rung at step {rung}")
        for cb in callbacks:
            cb(t, row)

    try:
        result = train(model_cfg, train_cfg, stop=stop, callbacks=[watch])
    except (RuntimeError, MemoryError, ValueError) as e:
        t.status, t.reason = "failed", str(e).splitlines()[0][:300]
        return
    t.run_dir = str(result.run_dir)
    if t.status != "over memory":
        t.status = "trained" if t.val_bpb == t.val_bpb else "failed"
        if t.status == "failed":
            t.reason = f"no validation figure by step {result.steps}: {result.stopped}"

