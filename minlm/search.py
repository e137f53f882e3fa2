"""Hyperparameter search under a memory budget, on Optuna, with successive halving.

Every candidate is a dict of overrides on a base ``ModelConfig``/``TrainConfig`` (any field of
either). Before a candidate trains, one real training step at its batch measures its peak
memory; over the budget, it is skipped with the figures. Each trial that trains is a normal run
folder. The candidates run as an Optuna study stored in SQLite: Optuna's successive-halving
pruner stops a trial at a rung (a fraction of ``max_iters``) when it is not among the best
1/eta of the trials that reached that rung, a killed search resumes where it stopped (a trial
cut short by the kill resumes exactly from its checkpoint), and several processes can share
one study. A trial whose memory goes over the budget during training is stopped and marked.
Instead of a grid, ``sampler="tpe"`` lets Optuna's TPE sampler draw ``n_trials`` candidates
from a search space, each informed by the trials before it; ``pruner="hyperband"`` runs
Hyperband (several successive-halving brackets, some cutting later) at the same rungs.
Optuna rather than hand-written halving: its pruner, sampler, storage, heartbeats and retries
are maintained and tested where many people use them.

    results = search(grid(dim=[64, 128], n_layers=[2, 4], lr=[1e-3, 3e-3]),
                     ModelConfig.from_preset("llama-1m"), TrainConfig(max_iters=600),
                     memory_budget="2GB", eta=3)
    results.table        # one row per trial, best val bits per byte first
    results.figure()     # val bits per byte against parameters and against compute
    search(None, model_cfg, train_cfg, sampler="tpe", n_trials=20, pruner="hyperband",
           space={"lr": (1e-3, 1e-2, "log"), "n_layers": [2, 4], "dim": (64, 192)})
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

import minlm.fast as fast
from minlm import runs
from minlm.config import ModelConfig, TrainConfig, check_folder_name
from minlm.flops import flops_per_token
from minlm.model import LM

_MODEL_FIELDS = {f.name for f in dataclasses.fields(ModelConfig)}
_TRAIN_FIELDS = {f.name for f in dataclasses.fields(TrainConfig)}
SAMPLERS = ("grid", "tpe")
PRUNERS = ("halving", "hyperband")


class SearchInterrupted(KeyboardInterrupt):
    """SIGTERM stopped the search (``exit_code`` 143, as ``train``); Ctrl-C raises a plain
    ``KeyboardInterrupt`` (a script then ends as Python ends on Ctrl-C). Either message says
    where the search stopped and how to resume it."""

    exit_code = 143


def _interrupted(message: str, exit_code: int) -> KeyboardInterrupt:
    return SearchInterrupted(message) if exit_code == 143 else KeyboardInterrupt(message)


class _QuietInterrupt:
    """A logging filter for Optuna: a trial stopped by Ctrl-C or SIGTERM is reported by the
    search's own line, not by Optuna's warning with its traceback."""

    hide_next = False

    def filter(self, record) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, KeyboardInterrupt):
            self.hide_next = True  # its next line, "failed with value None", goes as well
            return False
        if self.hide_next and "failed with value" in record.getMessage():
            self.hide_next = False
            return False
        return True


@contextlib.contextmanager
def _stop_signals(where: Callable[[], str]):
    """Ctrl-C and SIGTERM between trials (or before a trial's training starts) end the search
    as they end a training: with ``KeyboardInterrupt`` or ``SearchInterrupted`` (the
    trainer's own handlers take over while it trains, and stop it after its step).
    ``where`` says what was running."""
    import logging
    import signal
    import threading

    quiet = _QuietInterrupt()
    log = logging.getLogger("optuna.study._optimize")
    log.addFilter(quiet)
    if threading.current_thread() is not threading.main_thread():
        try:
            yield
        finally:
            log.removeFilter(quiet)
        return

    def stop(signum, _frame):
        how, code = (("interrupted (Ctrl-C)", 130) if signum == signal.SIGINT
                     else ("terminated (SIGTERM)", 143))
        raise _interrupted(f"search {how} {where()}; run the same search again to resume it",
                           code)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        log.removeFilter(quiet)
_UNITS = {"": 1, "b": 1, "kb": 2**10, "mb": 2**20, "gb": 2**30, "kib": 2**10, "mib": 2**20,
          "gib": 2**30}


# --- candidates ----------------------------------------------------------------------------

def grid(**axes: Sequence) -> list[dict]:
    """Every combination of the values given per field: ``grid(dim=[64, 128], lr=[1e-3])``."""
    _check_fields(axes)
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*axes.values())]


def random_candidates(n: int, seed: int = 0, **space) -> list[dict]:
    """``n`` random candidates from a space spelled as for TPE (``check_space``): a list is a
    choice, ``(lo, hi)`` a uniform range and ``(lo, hi, "log")`` a log-uniform one (ints stay
    ints when both ends are ints)."""
    check_space(space)
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        cand = {}
        for name, spec in space.items():
            if isinstance(spec, list):
                cand[name] = rng.choice(spec)
                continue
            lo, hi = spec[:2]
            v = (math.exp(rng.uniform(math.log(lo), math.log(hi))) if spec[2:] == ("log",)
                 else rng.uniform(lo, hi))
            cand[name] = round(v) if isinstance(lo, int) and isinstance(hi, int) else v
        out.append(cand)
    return out


def _check_fields(fields: dict) -> None:
    unknown = sorted(set(fields) - _MODEL_FIELDS - _TRAIN_FIELDS)
    if unknown:
        raise ValueError(f"unknown config field(s) to search: {', '.join(unknown)}; any field of "
                         "ModelConfig or TrainConfig can be searched")


def parse_space(items: list[str], preset: str,
                tpe: bool) -> tuple[ModelConfig, TrainConfig, dict]:
    """The search ``python -m minlm search`` is given as ``key=value`` items: ``key=a,b,c`` is
    an axis of the grid (a choice for TPE), ``key=lo:hi[:log]`` a range (TPE only), ``key=a``
    a fixed setting. Returns the base configs (the fixed settings on ``preset``) and the space
    with every value parsed and checked by the config that owns its field."""
    from minlm.config import ConfigError
    from minlm.settings import item_key, preset_config, route_items

    fixed, axes, ranges = [], {}, {}
    for item in items:
        value = item.partition("=")[2]
        if _is_range(value):
            if not tpe:
                raise ConfigError(f"{item!r} is a range; ranges need --sampler tpe (a grid "
                                  "takes key=a,b,c)")
            ranges[item_key(item)] = value.split(":")
        elif "," in value:
            axes[item_key(item)] = [v.strip() for v in value.split(",")]
        else:
            fixed.append(item)
    varied = {**axes, **ranges}
    model_items, train_items = route_items(fixed + [f"{k}={v[0]}" for k, v in varied.items()])
    model_cfg = preset_config(preset, [i for i in model_items if item_key(i) not in varied])
    train_cfg = TrainConfig(preset=preset).with_overrides(
        [i for i in train_items if item_key(i) not in varied])
    owner = {k: model_cfg if k in ModelConfig.field_names() else train_cfg for k in varied}

    def parse(key: str, value: str):
        return getattr(owner[key].with_overrides([f"{key}={value}"]), key)

    space = {k: [parse(k, v) for v in vals] for k, vals in axes.items()}
    space.update({k: (parse(k, v[0]), parse(k, v[1]), *v[2:]) for k, v in ranges.items()})
    return model_cfg, train_cfg, space


def _is_range(value: str) -> bool:
    """``lo:hi`` or ``lo:hi:log`` with numeric ends (``data=hf:owner/name`` is no range)."""
    parts = value.split(":")
    if len(parts) not in (2, 3) or parts[2:] not in ([], ["log"]):
        return False
    try:
        float(parts[0]), float(parts[1])
    except ValueError:
        return False
    return True


def check_space(space: dict) -> None:
    """A TPE search space: ``(lo, hi)`` or ``(lo, hi, "log")`` is a range (ints stay ints when
    both ends are ints), a list a choice among its values."""
    _check_fields(space)
    if not space:
        raise ValueError("space={} is empty: give at least one field, e.g. "
                         "{'lr': (1e-3, 1e-2, 'log'), 'n_layers': [2, 4]}")
    for name, spec in space.items():
        if isinstance(spec, list):
            if not spec:
                raise ValueError(f"space[{name!r}]=[] is invalid: a choice needs values")
            continue
        ok = (isinstance(spec, tuple) and len(spec) in (2, 3)
              and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in spec[:2])
              and spec[2:] in ((), ("log",)) and spec[0] < spec[1])
        if not ok or (spec[2:] == ("log",) and spec[0] <= 0):
            raise ValueError(f"space[{name!r}]={spec!r} is invalid: use a list of choices, "
                             "(lo, hi) with lo < hi, or (lo, hi, 'log') with 0 < lo < hi")


def _suggest(trial, space: dict) -> dict:
    """The overrides a TPE trial draws from ``space`` (see ``check_space``)."""
    out = {}
    for name, spec in space.items():
        if isinstance(spec, list):
            out[name] = trial.suggest_categorical(name, spec)
        elif isinstance(spec[0], int) and isinstance(spec[1], int):
            out[name] = trial.suggest_int(name, spec[0], spec[1], log=spec[2:] == ("log",))
        else:
            out[name] = trial.suggest_float(name, float(spec[0]), float(spec[1]),
                                            log=spec[2:] == ("log",))
    return out


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
    # the fused loss holds one chunk of fp32 logits at a time, outside what autograd saves
    workspace = fast.fused_loss_workspace(x.numel(), model_cfg.vocab_size) if fast.enabled() else 0
    return weights + grads + state + sum(saved.values()) + workspace


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
    run_dir: str = ""  # the run folder, as this process reaches it (the table holds its name)
    curve: list[tuple[int, float]] = field(default_factory=list)  # (step, val bpb)


@dataclass
class SearchResult:
    trials: list[Trial]
    dir: Path | None = None  # the search folder: its runs, study.db, results.csv

    def _in_dir(self, run_dir: str) -> str:
        """A run folder relative to the search folder, so a table still holds when the folder
        moves (another machine, a renamed parent)."""
        if not run_dir or self.dir is None:
            return run_dir
        return os.path.relpath(Path(run_dir).resolve(), Path(self.dir).resolve())

    @property
    def table(self):
        """One row per trial, best val bits per byte first (trials without one last)."""
        import pandas as pd

        rows = []
        for t in self.trials:
            rows.append({"trial": t.name, **t.overrides, "params": t.params,
                         "peak_memory_mb": round(t.peak_memory / 2**20, 1), "steps": t.steps,
                         "tokens": t.tokens, "compute_flops": t.compute, "val_bpb": t.val_bpb,
                         "status": t.status, "reason": t.reason,
                         "run_dir": self._in_dir(t.run_dir)})
        df = pd.DataFrame(rows)
        return df.sort_values("val_bpb", na_position="last", kind="stable").reset_index(drop=True)

    def save(self) -> Path:
        """Write ``results.csv`` (run folders relative to the search folder; read it back with
        ``read_results``) and ``results.png`` into the search folder; returns the table's path."""
        if self.dir is None:
            raise ValueError("this search result has no folder to save into (dir=None)")
        Path(self.dir).mkdir(parents=True, exist_ok=True)
        path = Path(self.dir) / "results.csv"
        self.table.to_csv(path, index=False)
        self.figure().savefig(Path(self.dir) / "results.png", dpi=120)
        return path

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


def read_results(search_dir: str | os.PathLike):
    """The ``results.csv`` of a search folder, its ``run_dir`` column resolved to paths this
    process can open (tables written before run folders were relative hold absolute paths,
    which stay as they are)."""
    import pandas as pd

    search_dir = Path(search_dir)
    path = search_dir / "results.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no search results at {path}")
    table = pd.read_csv(path)
    table["run_dir"] = [str(search_dir / r) if r else ""
                        for r in table["run_dir"].fillna("").astype(str)]
    return table


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


def search(candidates: Sequence[dict] | None, model_cfg: ModelConfig, train_cfg: TrainConfig,
           memory_budget: int | float | str | None = None, eta: int = 3, n_rungs: int = 3,
           name: str = "search", device: str | torch.device | None = None,
           callbacks: Sequence[Callable[[Trial, dict], None]] = (),
           compute_budget: float | None = None, max_params: int | None = None,
           verbose: bool = True, storage: str | None = None,
           heartbeat: int = 10, sampler: str = "grid", space: dict | None = None,
           n_trials: int = 0, pruner: str = "halving", seed: int | None = None,
           seeds: int = 1, names: Sequence[str] | None = None) -> SearchResult:
    """Train each candidate (dicts of config overrides) as a run under
    ``train_cfg.out_dir/<name>/``, skipping those whose measured step memory exceeds
    ``memory_budget`` (bytes or "2GB"), and pruning with Optuna's successive-halving pruner at
    ``n_rungs`` rungs (``n_rungs=1``: no pruning). Returns the trials, best first in ``.table``.

    The candidates are an Optuna study (grid order: each candidate once, queued in the order
    given), stored by default in ``<out_dir>/<name>/study.db`` (SQLite; ``storage`` takes any
    Optuna storage URL). Running the same search again resumes the study: finished trials are
    read back, not repeated, and a trial whose process was killed is retried from its run
    folder's last checkpoint once its heartbeat (every ``heartbeat`` seconds) has been silent
    for three beats. Several processes running the same search share its trials.

    ``sampler="tpe"`` (with ``candidates=None``) draws ``n_trials`` candidates from ``space``
    instead (``{"lr": (1e-3, 1e-2, "log"), "n_layers": [2, 4]}``: see ``check_space``) with
    Optuna's TPE sampler (``seed`` makes its draws repeatable); a candidate over the memory or
    parameter limit is a skipped trial and counts among the ``n_trials``. Run again, the
    search draws only the trials still missing; a larger ``n_trials`` extends it.

    The pruner is asynchronous (ASHA): a trial reaching a rung continues if it is among the
    best 1/``eta`` of all trials that reached that rung so far, so the first trials are never
    cut. ``pruner="hyperband"`` spreads the trials over Optuna's Hyperband brackets at the
    same rungs, some of which cut later, hedging against curves that cross. Every trial
    trains for ``train_cfg.max_iters`` steps, which favours the larger
    models. With ``compute_budget`` (training FLOPs per trial) each trial instead gets the
    steps that budget buys, so a model twice the size trains half as long, schedule included,
    and the rungs compare trials at equal compute: the question a fixed amount of hardware time
    asks. ``max_params`` skips (with the reason) candidates with more parameters.

    ``seeds`` > 1 (grid only) trains every candidate that many times as one seed group
    (``minlm.seeds``): trial ``<name>-s<k>`` with seed ``train_cfg.seed + k`` and
    ``group=<name>``, so ``compare`` shows each candidate's spread. ``names`` gives the grid's
    trials (and so their run folders) names of the caller's choosing, e.g. a ladder's rungs.
    """
    import optuna  # noqa: F401 - the search extra: missing, the command says so before any work

    from minlm.outputs import check_target, mark_folder
    from minlm.train import resolve_device

    check_folder_name("name", name)  # the trials go under out_dir/name, nowhere else
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler={sampler!r} is invalid: use one of {', '.join(SAMPLERS)}")
    if pruner not in PRUNERS:
        raise ValueError(f"pruner={pruner!r} is invalid: use one of {', '.join(PRUNERS)}")
    if sampler == "grid" and not candidates:
        raise ValueError("no candidates to search; build them with grid(...) or "
                         "random_candidates(...), or use sampler='tpe' with a space")
    if sampler == "tpe":
        if candidates:
            raise ValueError(f"sampler='tpe' draws its candidates from space; got {len(candidates)} "
                             "candidates too (pass None)")
        check_space(space or {})
        if n_trials < 1:
            raise ValueError(f"n_trials={n_trials} is invalid: sampler='tpe' needs n_trials >= 1")
    if eta < 2 or n_rungs < 1:
        raise ValueError(f"eta={eta} must be >= 2 and n_rungs={n_rungs} >= 1")
    if heartbeat < 1:
        raise ValueError(f"heartbeat={heartbeat} must be a whole number of seconds >= 1")
    if names is not None and (sampler != "grid" or len(names) != len(candidates)
                              or len(set(names)) != len(names)):
        raise ValueError(f"names must give each of the {len(candidates or [])} grid candidates "
                         f"a distinct name; got {len(names)} names")
    for n in names or []:
        check_folder_name("names", n)
    if seeds != 1:
        from minlm.seeds import check_seeds

        check_seeds(seeds)
        if sampler != "grid":
            raise ValueError(f"seeds={seeds} trains each grid candidate over several seeds; "
                             "with sampler='tpe' put seed among the space instead, or use a grid")
        clash = [c for c in candidates if "seed" in c or "group" in c]
        if clash:
            raise ValueError(f"seeds={seeds} sets each trial's seed and group; the candidate "
                             f"{clash[0]} sets them too (drop seed/group from the candidates)")
        base = list(names) if names is not None else [_trial_name(i, c)
                                                      for i, c in enumerate(candidates)]
        names = [f"{n}-s{k}" for n in base for k in range(seeds)]
        candidates = [{**c, "seed": train_cfg.seed + k, "group": n}
                      for n, c in zip(base, candidates) for k in range(seeds)]
    budget = parse_bytes(memory_budget)
    dev = resolve_device(str(device) if device is not None else train_cfg.device)
    say = _say(verbose)
    out_dir = Path(train_cfg.out_dir) / name
    base_train = train_cfg.replace(out_dir=str(out_dir), verbose=False, resume=False)

    def checked(t: Trial):
        return _checked_candidate(t, model_cfg, base_train, budget, compute_budget, max_params,
                                  dev, say)

    trials: list[Trial] = []
    configs: dict[str, tuple[ModelConfig, TrainConfig]] = {}
    runnable: list[int] = []
    for i, overrides in enumerate(candidates or []):
        t = Trial(name=names[i] if names is not None else _trial_name(i, overrides),
                  overrides=dict(overrides))
        trials.append(t)
        conf = checked(t)
        if conf is not None:
            configs[t.name] = conf
            runnable.append(i)

    keys = ([json.dumps(c, sort_keys=True, default=str) for c in candidates] if sampler == "grid"
            else {"space": json.dumps(space, sort_keys=True, default=str)})
    # the rule for every output folder (minlm.outputs): an earlier search's folder, or new
    check_target(out_dir, "search", overwrite=True, name="search folder")
    study = _open_study(out_dir, name, keys, runnable, eta, n_rungs, storage, heartbeat,
                        pruner, seed)
    mark_folder(out_dir, "search", storage or out_dir / "study.db")

    def objective(trial) -> float:
        import optuna

        every = study.get_trials(deepcopy=False)
        frozen = next(f for f in every if f.number == trial.number)
        if sampler == "grid":
            if "fixed_params" not in frozen.system_attrs:  # another process emptied the queue first
                trial.set_user_attr("status", "none left")
                return math.nan
            i = trial.suggest_categorical("candidate", list(range(len(candidates))))
            t, conf = trials[i], configs[trials[i].name]
            # an earlier trial of this candidate (killed, interrupted) left its run folder
            again = any(f.params.get("candidate") == i for f in every if f.number < trial.number)
        else:  # a retried (killed) or requeued (interrupted) trial keeps its first number
            first = _first_number(frozen)
            t = Trial(name="", overrides=_suggest(trial, space))
            t.name = _trial_name(first, t.overrides)
            conf, again = checked(t), first != trial.number
            trial.set_user_attr("name", t.name)
        trial.set_user_attr("pid", os.getpid())
        current[0] = t.name
        code = 0
        if conf is not None:
            m, tc = conf
            rungs = _rungs(tc.max_iters, tc.eval_interval, eta, n_rungs)
            # resume the run folder an earlier trial of this candidate left (with a checkpoint:
            # a trial stopped before its first one starts again)
            again = again and bool(runs.list_checkpoints(out_dir / t.name))
            code = _train_trial(t, trial, study, m, tc.replace(resume=again, overwrite=not again),
                                rungs, eta, dev, budget, callbacks)
        for k in ("status", "reason", "steps", "tokens", "compute", "val_bpb", "peak_memory",
                  "params"):
            trial.set_user_attr(k, getattr(t, k))
        # relative, as in results.csv: the study stays valid when the search folder moves
        trial.set_user_attr("run_dir", SearchResult(trials, out_dir)._in_dir(t.run_dir))
        trial.set_user_attr("curve", [list(c) for c in t.curve])
        if conf is None:  # skipped or invalid (TPE): said already, counted, not trained
            return math.nan
        say(f"{t.name}: {t.status}" + (f"; {t.reason}" if t.reason else
                                       f", val bpb {t.val_bpb:.4f} at step {t.steps}"))
        if t.status in ("cut", "over memory"):
            raise optuna.TrialPruned()
        if t.status == "interrupted":  # the trial fails; the next run of the search resumes it
            how = "terminated (SIGTERM)" if code == 143 else "interrupted (Ctrl-C)"
            raise _interrupted(f"search {how} in {t.name} at step {t.steps}; the trial is saved "
                               "as interrupted: run the same search again to resume it from "
                               "its checkpoint", code)
        return t.val_bpb if t.status == "trained" else math.nan

    current = [""]  # the trial being worked on, for the message of a stop between trials

    def where() -> str:
        return f"in {current[0]} before its training started" if current[0] else "between trials"

    with _stop_signals(where):
        _work_on(study, objective, heartbeat, out_dir / "study.lock",
                 n_trials if sampler == "tpe" else None)
    if sampler == "grid":
        _read_back(study, trials, runnable, out_dir)
    else:
        trials = _read_back_drawn(study, out_dir)
    return SearchResult(trials, out_dir)


def _trial_name(number: int, overrides: dict) -> str:
    label = ",".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                     for k, v in overrides.items())
    return f"trial{number:02d}-{label}".replace("/", "_")[:100]


def _checked_candidate(t: Trial, model_cfg: ModelConfig, base_train: TrainConfig,
                       budget: int | None, compute_budget: float | None, max_params: int | None,
                       dev: torch.device, say) -> tuple[ModelConfig, TrainConfig] | None:
    """The configs of a candidate that may train; None (``t`` marked skipped or failed, with
    the reason) when it is invalid, over ``max_params``, or over the memory budget by the
    estimate or by one measured training step."""
    from minlm.memory import estimate_training_bytes

    try:
        m, tc = split_overrides(t.overrides, model_cfg, base_train)
        if compute_budget:
            tc = tc.replace(max_iters=steps_for_compute(m, tc, compute_budget))
        t.params = LM.count_params(m)
        if max_params is not None and t.params > max_params:
            t.status = "skipped"
            t.reason = f"{t.params:,} parameters, over the limit of {max_params:,}"
            say(f"{t.name}: skipped; {t.reason}")
            return None
        estimate = estimate_training_bytes(m, tc.batch_size)
        if budget is not None and estimate > 2 * budget:  # far over: do not even try it
            t.status, t.peak_memory = "skipped", estimate
            t.reason = (f"estimated {estimate / 2**20:,.1f} MiB for one training step, "
                        f"far over the budget of {budget / 2**20:,.1f} MiB")
            say(f"{t.name}: skipped; {t.reason}")
            return None
        t.peak_memory = measure_step_memory(m, tc, dev)
    except (ValueError, TypeError) as e:
        t.status, t.reason = "failed", f"invalid config: {e}"
        return None
    except (RuntimeError, MemoryError) as e:
        t.status, t.reason = "skipped", f"one training step failed: {str(e)[:200]}"
        return None
    if budget is not None and t.peak_memory > budget:
        t.status = "skipped"
        t.reason = (f"one training step needs {t.peak_memory / 2**20:,.1f} MiB, over the "
                    f"budget of {budget / 2**20:,.1f} MiB")
        say(f"{t.name}: skipped; {t.reason}")
        return None
    return m, tc.replace(run_name=t.name)


def _first_number(frozen) -> int:
    """The number of the first trial of a drawn candidate: a trial retried after a kill
    (Optuna's ``failed_trial``) or requeued after Ctrl-C (``resumes``) continues its run."""
    return frozen.user_attrs.get("resumes", frozen.system_attrs.get("failed_trial", frozen.number))


def _say(verbose: bool):
    from tqdm.auto import tqdm

    return tqdm.write if verbose else (lambda *a, **k: None)


class StudyStorageError(ValueError):
    """The study's storage cannot be read: a corrupt ``study.db``, or a database URL that does
    not answer. One line for the user, never the driver's SQL."""


def sqlalchemy_errors() -> tuple:
    from sqlalchemy.exc import DatabaseError

    return (DatabaseError,)  # OperationalError (no server, locked) is one of these too


def storage_problem(url: str, storage: str | None, e: Exception) -> str:
    """What went wrong with the study's storage and what to do, in one line."""
    said = str(getattr(e, "orig", None) or e).splitlines()[0]
    if storage:
        return (f"cannot open the study storage {storage}: {said}; check the URL and that the "
                "database answers")
    path = url.removeprefix("sqlite:///")
    return (f"cannot read the search's study {path}: {said} (corrupt, or not a study file); "
            "move it aside and run the search again to start a new study (the trial run "
            "folders beside it are kept), or put back a copy of it")


def _open_study(out_dir: Path, name: str, keys: list | dict, runnable: list[int],
                eta: int, n_rungs: int, storage: str | None, heartbeat: int,
                pruner: str = "halving", seed: int | None = None):
    """Create or load the study. A grid (``keys`` lists its candidates) queues, once, under a
    file lock shared by every process of this search, each runnable candidate no trial holds
    yet; a drawn search (``keys`` holds its space) requeues each trial stopped by Ctrl-C."""
    import fcntl
    import warnings

    import optuna
    from optuna.trial import TrialState

    out_dir.mkdir(parents=True, exist_ok=True)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url = storage or f"sqlite:///{out_dir.resolve() / 'study.db'}"
    if n_rungs == 1:
        cutter = optuna.pruners.NopPruner()
    elif pruner == "hyperband":  # rung k is reported as step eta**k, the last is eta**(n-1)
        cutter = optuna.pruners.HyperbandPruner(min_resource=1, max_resource=eta ** (n_rungs - 1),
                                                reduction_factor=eta)
    else:
        cutter = optuna.pruners.SuccessiveHalvingPruner(min_resource=1, reduction_factor=eta,
                                                        min_early_stopping_rate=0)
    grid_search = isinstance(keys, list)
    with open(out_dir / "study.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            with warnings.catch_warnings():  # heartbeats are marked experimental
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                retry = optuna.storages.RetryHeartbeatStaleTrialCallback(
                    max_retry=3, inherit_intermediate_values=True)
                rdb = optuna.storages.RDBStorage(
                    url, heartbeat_interval=heartbeat, grace_period=3 * heartbeat,
                    heartbeat_stale_trial_callback=retry,
                    engine_kwargs={"connect_args": {"timeout": 60}}
                    if url.startswith("sqlite") else None)
            study = optuna.create_study(storage=rdb, study_name=name, direction="minimize",
                                        pruner=cutter, load_if_exists=True,
                                        sampler=optuna.samplers.TPESampler(seed=seed))
        except sqlalchemy_errors() as e:
            raise StudyStorageError(storage_problem(url, storage, e)) from None
        attr, other = ("candidates", "space") if grid_search else ("space", "candidates")
        saved = study.user_attrs.get(attr)
        if other in study.user_attrs:
            raise ValueError(f"study {name!r} in {url} holds a search by "
                             f"{'grid' if other == 'candidates' else 'TPE sampling'}; give this "
                             "search another name, or delete the study to start it again")
        if saved is None:
            study.set_user_attr(attr, keys)
        elif saved != keys and grid_search:
            raise ValueError(f"study {name!r} in {url} holds other candidates ({len(saved)}, "
                             f"not these {len(keys)}); give this search another name, or "
                             "delete the study to start it again")
        elif saved != keys:
            raise ValueError(f"study {name!r} in {url} holds another space ({saved['space']}, "
                             f"not {keys['space']}); give this search another name, or delete "
                             "the study to start it again")
        live = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.RUNNING, TrialState.WAITING)
        if grid_search:  # candidates whose trials all failed (an error, Ctrl-C) are queued again
            held = {f.params.get("candidate",
                                 f.system_attrs.get("fixed_params", {}).get("candidate"))
                    for f in study.get_trials(deepcopy=False, states=live)}
            for i in runnable:
                if i not in held:
                    study.enqueue_trial({"candidate": i})
        else:
            every = study.get_trials(deepcopy=False)
            held = {_first_number(f) for f in every if f.state in live}
            for f in every:
                first = _first_number(f)
                if f.user_attrs.get("status") == "interrupted" and first not in held:
                    study.enqueue_trial(f.params, user_attrs={"resumes": first})
                    held.add(first)
    return study


def _counted(study) -> int:
    """Trials of a drawn search that count towards ``n_trials``: finished, running or queued,
    and those that ended on their own (skipped, failed); not those a kill or Ctrl-C stopped
    (their retry is queued)."""
    from optuna.trial import TrialState

    n = 0
    for f in study.get_trials(deepcopy=False):
        if f.state != TrialState.FAIL:
            n += 1
        elif "status" in f.user_attrs and f.user_attrs["status"] != "interrupted":
            n += 1
    return n


def _work_on(study, objective, heartbeat: int, lock_path: Path,
             n_trials: int | None = None) -> None:
    """Take queued trials (and, for a drawn search, start new ones while fewer than
    ``n_trials`` count) until none is left, then wait for those other processes still run
    (a process that dies leaves its trial to whoever notices its silent heartbeat).

    The file lock spans from seeing a queued trial (or a missing one) to starting it (the
    objective's first act is to let go), so two processes never race for the last one: the
    loser would make Optuna start a trial the queue did not hold, or one too many."""
    import fcntl
    import time
    import warnings

    from optuna.exceptions import ExperimentalWarning
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    with open(lock_path, "w") as lock:
        def popped(trial) -> float:
            fcntl.flock(lock, fcntl.LOCK_UN)
            return objective(trial)

        while True:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ExperimentalWarning)
                    fail_stale_trials(study)  # a killed process's trial goes back in the queue
                states = {f.state for f in study.get_trials(deepcopy=False)}
                if TrialState.WAITING in states or (n_trials and _counted(study) < n_trials):
                    study.optimize(popped, n_trials=1, catch=(), gc_after_trial=False)
                    continue
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
            if TrialState.RUNNING not in states:
                return
            time.sleep(heartbeat)


def _fill(t: Trial, attrs: dict, out_dir: Path) -> None:
    """A trial's figures as its study trial recorded them."""
    for k in ("status", "reason", "steps", "tokens", "compute"):
        setattr(t, k, attrs[k])
    t.run_dir = str(out_dir / attrs["run_dir"]) if attrs["run_dir"] else ""
    t.val_bpb = math.nan if attrs["val_bpb"] is None else float(attrs["val_bpb"])
    t.curve = [tuple(c) for c in attrs["curve"]]


def _read_back(study, trials: list[Trial], runnable: list[int], out_dir: Path) -> None:
    """Fill each runnable trial from the last finished study trial of its candidate."""
    from optuna.trial import TrialState

    last = {}
    for f in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                       TrialState.FAIL)):
        if "candidate" in f.params and "steps" in f.user_attrs:
            last[f.params["candidate"]] = f
    for i in runnable:
        t = trials[i]
        if i not in last:
            t.status, t.reason = "failed", "no finished trial in the study"
            continue
        _fill(t, last[i].user_attrs, out_dir)


def _read_back_drawn(study, out_dir: Path) -> list[Trial]:
    """One trial per drawn candidate, from the last finished study trial of each."""
    from optuna.trial import TrialState

    last = {}
    for f in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED,
                                                       TrialState.FAIL)):
        if "steps" in f.user_attrs:
            last[_first_number(f)] = f
    trials = []
    for first in sorted(last):
        attrs = last[first].user_attrs
        t = Trial(name=attrs["name"], overrides=dict(last[first].params),
                  params=attrs["params"], peak_memory=attrs["peak_memory"])
        _fill(t, attrs, out_dir)
        trials.append(t)
    return trials


def _train_trial(t: Trial, trial, study, model_cfg: ModelConfig, train_cfg: TrainConfig,
                 rungs: list[int], eta: int, device: torch.device, budget: int | None,
                 callbacks) -> None:
    """Train (or resume) one trial to the end, reporting its val bits per byte to the pruner
    at each rung before the last (as step ``eta**k`` for rung ``k``, so trials of different
    lengths compare rung by rung); stop it when the pruner says so or its memory goes over.
    Returns the training's exit code (130 / 143 when Ctrl-C / SIGTERM stopped it)."""
    from minlm.train import StopFlag, train

    stop = StopFlag()
    baseline = memory_in_use(device)
    per_token = flops_per_token(model_cfg)
    t.status, t.reason, t.curve = "pending", "", []

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
        elif row["step"] in rungs[:-1] and row.get("val_bpb") is not None:
            k = rungs.index(row["step"])
            trial.report(row["val_bpb"], eta**k)
            if trial.should_prune():
                t.status = "cut"
                t.reason = _cut_reason(study, row["val_bpb"], row["step"], eta**k, eta)
                stop.set(f"pruned at the search rung at step {row['step']}")
        for cb in callbacks:
            cb(t, row)

    try:
        result = train(model_cfg, train_cfg, stop=stop, callbacks=[watch])
    except (RuntimeError, MemoryError, ValueError) as e:
        t.status, t.reason = "failed", str(e).splitlines()[0][:300]
        return 0
    t.run_dir = str(result.run_dir)
    if t.status == "pending" and stop.kind in ("interrupt", "sigterm"):  # Ctrl-C, SIGTERM
        t.status, t.reason = "interrupted", result.stopped
    if t.status == "pending":
        t.status = "trained" if t.val_bpb == t.val_bpb else "failed"
        if t.status == "failed":
            t.reason = f"no validation figure by step {result.step}: {result.stopped}"
    return result.exit_code


def _cut_reason(study, value: float, step: int, rung_key: int, eta: int) -> str:
    others = sorted(f.intermediate_values[rung_key] for f in study.get_trials(deepcopy=False)
                    if rung_key in f.intermediate_values)
    keep = max(1, len(others) // eta)
    return (f"val bpb {value:.4f} at step {step}, behind the best {keep} of {len(others)} "
            f"trials at this rung (best {others[0]:.4f})")
