"""A scaling ladder: does an idea keep its lead over a baseline as models grow?

Both the idea and the baseline (each a preset plus ``key=value`` settings) train at several
sizes; every rung is an ordinary run folder, and the rungs are the trials of one grid search
(``minlm.search``, no pruning) in its Optuna study storage, so a killed ladder resumes
without repeating finished rungs and several processes (or machines) sharing one database URL
work through one ladder. Then, per idea, a saturating power law ``L = E + A * x^-alpha`` is
fitted to validation bits per byte against training compute (and against parameters), and
extrapolated to 10x the largest rung with its uncertainty from the fit's covariance.

The rules, stated once:

- **Shape.** The width steps in whole heads of the base preset's head size; the depth keeps
  the base's width per layer (``n_layers = round(dim / (base dim / base n_layers))``, at least
  1); the share of key/value heads stays the base's (the nearest divisor); vocabulary and
  context stay the base's. Of these shapes the rung takes the one whose parameter count
  (embeddings included) is nearest its target size in log scale.
- **Budget.** A rung trains ``tokens_per_param`` x its parameters tokens (Chinchilla's
  ~20 by default) at the base's batch and context, capped by ``max_minutes`` of wall clock
  (0: no cap); the learning-rate schedule decays by whichever runs out first.
- **Honesty check.** Each fit is repeated on every rung but the largest, and its prediction
  for the largest is set against the measured figure.

    result = ladder(["preset=gpt2-1m"], ["preset=llama-1m"], sizes="0.25M,0.5M,1M,2M",
                    tokens_per_param=20, max_minutes=10)
    result.table, result.fits      # one row per rung; one row per idea and axis
    result.figure()                # points, fits and the extrapolation, vs compute and params
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minlm.config import ConfigError, ModelConfig, TrainConfig

EXTRAPOLATE = 10.0  # the fit is carried to this multiple of the largest rung
AXES = {"compute": ("flops", "training compute (FLOPs)"), "params": ("params", "parameters")}


# --- sizes and shapes -------------------------------------------------------------------------

def parse_sizes(sizes: str | Sequence) -> list[int]:
    """``"0.25M,0.5M,1M,2M"`` (or a list of numbers) -> parameter counts, increasing."""
    items = sizes.split(",") if isinstance(sizes, str) else list(sizes)
    out = []
    for item in items:
        text = str(item).strip()
        scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
        try:
            value = float(text[:-1] if scale > 1 else text) * scale
        except ValueError:
            raise ConfigError(f"sizes: {text!r} is not a parameter count such as 0.25M, 500K "
                              "or 2000000") from None
        if value < 1:
            raise ConfigError(f"sizes: {text!r} must be a positive parameter count")
        out.append(int(value))
    if len(out) < 2 or sorted(set(out)) != out:
        raise ConfigError(f"sizes={sizes!r} must be two or more increasing parameter counts, "
                          "e.g. 0.25M,0.5M,1M,2M")
    return out


def rung_shape(base: ModelConfig, target: int) -> ModelConfig:
    """The base model resized to about ``target`` parameters by the module's shape rule."""
    from minlm.model import LM

    head = base.head_dim or base.dim // base.n_heads
    per_layer = base.dim / base.n_layers
    kv_share = (base.n_kv_heads or base.n_heads) / base.n_heads
    best, best_gap = None, math.inf
    for heads in range(1, 257):
        dim = heads * head
        kv = min((d for d in range(1, heads + 1) if heads % d == 0),
                 key=lambda d: abs(d - kv_share * heads))
        cfg = base.replace(dim=dim, n_heads=heads, n_kv_heads=0 if kv == heads else kv,
                           head_dim=base.head_dim and head,
                           n_layers=max(1, round(dim / per_layer)))
        gap = abs(math.log(LM.count_params(cfg) / target))
        if gap < best_gap:
            best, best_gap = cfg, gap
        elif LM.count_params(cfg) > target:  # counts only grow from here
            break
    return best


# --- the power law --------------------------------------------------------------------------

@dataclass
class Fit:
    """``L = E + A * (x / x0)^-alpha`` with the parameters' covariance (``cov``, order E, A,
    alpha; NaN where the points do not determine it, e.g. three points for three parameters).
    ``x0`` (the smallest x) keeps A on the scale of the losses."""

    E: float
    A: float
    alpha: float
    x0: float
    cov: np.ndarray
    n: int

    def predict(self, x) -> np.ndarray:
        return self.E + self.A * (np.asarray(x, float) / self.x0) ** -self.alpha

    def sd(self, x) -> np.ndarray:
        """Standard deviation of the prediction at ``x`` by the delta method."""
        r = np.asarray(x, float) / self.x0
        grad = np.stack([np.ones_like(r), r ** -self.alpha,
                         -self.A * r ** -self.alpha * np.log(r)])  # (3, points)
        return np.sqrt(np.einsum("ip,ij,jp->p", grad, self.cov, grad.reshape(3, -1)))

    @property
    def alpha_sd(self) -> float:
        return float(math.sqrt(self.cov[2, 2])) if np.isfinite(self.cov[2, 2]) else math.nan


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> Fit:
    """Least-squares fit of the saturating power law (scipy.optimize.curve_fit, from several
    starting exponents, bounded to E in [0, min y], A >= 0, alpha in (0, 3]); the best one."""
    from scipy.optimize import OptimizeWarning, curve_fit

    x, y = np.asarray(x, float), np.asarray(y, float)
    if len(x) < 3 or len(x) != len(y) or not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"a power law of three parameters needs three or more finite points; "
                         f"got x={list(x)}, y={list(y)}")
    x0 = float(x.min())

    def law(r, E, A, alpha):
        return E + A * r ** -alpha

    best = None
    for alpha0 in (0.05, 0.2, 0.5, 1.0):
        r = x / x0
        A0 = max(1e-6, (y.max() - y.min()) / max(1e-9, 1 - (r.max()) ** -alpha0))
        E0 = max(0.0, min(y.min() - 1e-3, y.max() - A0))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", OptimizeWarning)
                p, cov = curve_fit(law, r, y, p0=(E0, A0, alpha0), maxfev=20000,
                                   bounds=([0, 0, 1e-4], [y.min(), np.inf, 3.0]))
        except RuntimeError:
            continue
        sse = float(((law(r, *p) - y) ** 2).sum())
        if best is None or sse < best[0] - 1e-15:
            best = (sse, p, cov)
    if best is None:
        raise ValueError(f"the power law did not converge on x={list(x)}, y={list(y)}")
    _, p, cov = best
    cov = np.where(np.isfinite(cov), cov, np.nan) if len(x) > 3 else np.full((3, 3), np.nan)
    return Fit(float(p[0]), float(p[1]), float(p[2]), x0, cov, len(x))


# --- the ladder -------------------------------------------------------------------------------

def _recipe(settings: Sequence[str]) -> tuple[str, ModelConfig, list[str]]:
    """(preset, model config, training items) of a preset plus key=value settings."""
    from minlm.settings import canonical_item, preset_config, route_items, take_preset

    preset, items = take_preset([canonical_item(s) for s in settings], None)
    model_items, train_items = route_items(items)
    preset = preset or "llama-1m"
    return preset, preset_config(preset, model_items), train_items


def _diff(cfg, base) -> dict:
    return {k: v for k, v in cfg.to_dict().items() if getattr(base, k) != v}


@dataclass
class LadderResult:
    """The rungs (``table``: one row per idea, size and seed) and the fits (``fits``: one row
    per idea and axis), as written to ``ladder.csv`` and ``fits.csv`` in ``dir``."""

    table: object
    dir: Path | None = None

    @property
    def fits(self):
        return fits_table(self.table)

    def save(self) -> Path:
        if self.dir is None:
            raise ValueError("this ladder result has no folder to save into (dir=None)")
        self.dir.mkdir(parents=True, exist_ok=True)
        self.table.to_csv(self.dir / "ladder.csv", index=False)
        self.fits.to_csv(self.dir / "fits.csv", index=False)
        self.figure().savefig(self.dir / "ladder.png", dpi=120)
        return self.dir / "ladder.csv"

    def figure(self):
        return ladder_figure(self.table)


def _points(table, idea: str, axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean val bpb (and its spread over seeds) per rung of one idea, against ``axis``."""
    done = table[(table["idea"] == idea) & table["val_bpb"].notna()]
    by = done.groupby("target_params", sort=True)
    column = AXES[axis][0]
    x = by[column].mean().to_numpy(float)
    y = by["val_bpb"].mean().to_numpy(float)
    sd = by["val_bpb"].std(ddof=1).fillna(0.0).to_numpy(float)
    return x, y, sd


def short_rungs(table):
    """The trained rungs that stopped before their token budget (the time cap ran out first).
    Such a rung sits off the tokens-per-parameter rule the other rungs follow: at nearly the
    compute of a smaller rung that got its budget, the larger model trained on fewer tokens is
    worse, which no law of loss against compute fitted to budget-complete rungs predicts."""
    if "budget_tokens" not in table:  # a table written before the budget was recorded
        return table.iloc[0:0]
    return table[(table["status"] == "trained") & (table["tokens"] < table["budget_tokens"])]


def fits_table(table):
    """Per idea and axis: the fit on every rung (E, A, alpha and its sd), its prediction at
    10x the largest rung with the sd, and the honesty check: the fit on every rung but the
    largest, its prediction for the largest, the measured figure and the error."""
    import pandas as pd

    rows = []
    for idea in dict.fromkeys(table["idea"]):
        for axis in AXES:
            x, y, _ = _points(table, idea, axis)
            row = {"idea": idea, "axis": axis, "rungs": len(x)}
            if len(x) >= 3:
                fit = fit_power_law(x, y)
                far = EXTRAPOLATE * x.max()
                row.update(E=fit.E, A=fit.A, alpha=fit.alpha, alpha_sd=fit.alpha_sd, x0=fit.x0,
                           x_10x=far, bpb_10x=float(fit.predict(far)),
                           bpb_10x_sd=float(fit.sd([far])[0]))
            if len(x) >= 4:
                held = fit_power_law(x[:-1], y[:-1])
                pred = float(held.predict(x[-1]))
                row.update(heldout_x=x[-1], heldout_predicted=pred,
                           heldout_sd=float(held.sd([x[-1]])[0]), heldout_measured=y[-1],
                           heldout_error=pred - y[-1])
            rows.append(row)
    return pd.DataFrame(rows)


def ladder_figure(table):
    """Both ideas' rungs (mean ± sd over seeds), their fits, and the extrapolation to 10x the
    largest rung (dashed, with a band of ± one sd), against compute and against parameters."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4.2))
    axes = fig.subplots(1, 2, sharey=True)
    for ax, axis in zip(axes, AXES):
        for k, idea in enumerate(dict.fromkeys(table["idea"])):
            color = f"C{k}"
            x, y, sd = _points(table, idea, axis)
            ax.errorbar(x, y, yerr=sd, fmt="o", color=color, capsize=3, label=f"{idea} rungs")
            if len(x) < 3:
                continue
            fit = fit_power_law(x, y)
            seen = np.geomspace(x.min(), x.max(), 50)
            ahead = np.geomspace(x.max(), EXTRAPOLATE * x.max(), 50)
            ax.plot(seen, fit.predict(seen), color=color,
                    label=f"{idea}: {fit.E:.3f} + {fit.A:.3f}·(x/x0)^-{fit.alpha:.3f}")
            ax.plot(ahead, fit.predict(ahead), color=color, linestyle="--")
            band = fit.sd(ahead)
            if np.isfinite(band).all():
                ax.fill_between(ahead, fit.predict(ahead) - band, fit.predict(ahead) + band,
                                color=color, alpha=0.15, linewidth=0)
            if len(x) >= 4:
                held = fit_power_law(x[:-1], y[:-1])
                ax.scatter([x[-1]], held.predict(x[-1]), marker="x", color=color, s=60,
                           label=f"{idea}: largest rung predicted from the others")
        ax.set_xscale("log")
        ax.set_xlabel(AXES[axis][1])
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    axes[0].set_ylabel("validation bits per byte")
    fig.suptitle(f"scaling ladder: fits L = E + A·(x/x0)^-alpha, dashed to {EXTRAPOLATE:g}x the "
                 "largest rung (band: ± 1 sd from the fit covariance)", fontsize=9)
    fig.tight_layout()
    return fig


def read_ladder(folder: str | os.PathLike) -> LadderResult:
    """A ladder as its ``ladder.csv`` recorded it (for notebooks: no training)."""
    import pandas as pd

    path = Path(folder) / "ladder.csv"
    if not path.is_file():
        raise FileNotFoundError(f"no ladder table at {path}; run python -m minlm ladder first")
    return LadderResult(pd.read_csv(path), Path(folder))


def ladder(idea: Sequence[str], baseline: Sequence[str] = (), sizes="0.25M,0.5M,1M,2M",
           tokens_per_param: float = 20.0, max_minutes: float = 0.0,
           labels: tuple[str, str] = ("idea", "baseline"), name: str = "ladder",
           out_dir: str = "trained_models", storage: str | None = None, seeds: int = 1,
           train: Sequence[str] = (), evals: int = 4, heartbeat: int = 10,
           verbose: bool = True, callbacks=()) -> LadderResult:
    """Train ``idea`` and ``baseline`` (each a list of ``key=value`` settings, ``preset=``
    among them; the baseline defaults to llama-1m as it is) at every size of ``sizes`` and
    fit how each scales (see the module's rules). ``train`` holds settings common to every
    rung (``lr=...``, ``max_docs=...``); ``evals`` evaluations per rung (the last at its end).

    The rungs are trials of one grid search named ``name`` under ``out_dir`` (study storage
    ``storage``, default its SQLite file): run the same ladder again, from any process
    sharing the storage, and it resumes. Returns the rung table and fits, also written to
    ``out_dir/name/ladder.csv``, ``fits.csv`` and ``ladder.png``. ``callbacks`` get every
    rung's log rows as ``search`` passes them (trial, row)."""
    import pandas as pd

    from minlm.flops import flops_per_token
    from minlm.model import LM
    from minlm.search import search
    from minlm.settings import route_items

    targets = parse_sizes(sizes)
    if tokens_per_param <= 0:
        raise ConfigError(f"tokens_per_param={tokens_per_param} must be > 0")
    if max_minutes < 0:
        raise ConfigError(f"max_minutes={max_minutes} must be >= 0 (0: no time cap)")
    if evals < 1:
        raise ConfigError(f"evals={evals} must be >= 1")
    if len(labels) != 2 or labels[0] == labels[1]:
        raise ConfigError(f"labels={labels!r} must be two different names (idea, baseline)")
    _, extra = route_items(list(train))
    base_model = ModelConfig()
    base_train = TrainConfig(out_dir=out_dir).with_overrides(extra)
    candidates, names, rungs = [], [], []
    for label, settings in zip(labels, (idea, baseline)):
        preset, model_cfg, train_items = _recipe(list(settings))
        recipe_train = base_train.replace(preset=preset).with_overrides(train_items)
        for target in targets:
            cfg = rung_shape(model_cfg, target)
            params = LM.count_params(cfg)
            step_tokens = recipe_train.batch_size * recipe_train.grad_accum_steps * cfg.block_size
            steps = max(1, math.ceil(tokens_per_param * params / step_tokens))
            tc = recipe_train.replace(max_iters=steps, max_minutes=max_minutes,
                                      eval_interval=max(1, math.ceil(steps / evals)),
                                      checkpoint_interval=max(1, math.ceil(steps / evals)),
                                      warmup_iters=min(recipe_train.warmup_iters, steps // 2))
            candidates.append({**_diff(cfg, base_model), **_diff(tc, base_train)})
            size = _size_text(target)
            names.append(f"{label}-{size}")
            rungs.append({"idea": label, "size": size, "target_params": target,
                          "dim": cfg.dim, "n_layers": cfg.n_layers, "n_heads": cfg.n_heads,
                          "n_kv_heads": cfg.n_kv_heads, "flops_per_token": flops_per_token(cfg),
                          "budget_tokens": steps * step_tokens})
    result = search(candidates, base_model, base_train, n_rungs=1, name=name, storage=storage,
                    heartbeat=heartbeat, verbose=verbose, seeds=seeds, names=names,
                    callbacks=callbacks)
    rows = []
    for k, t in enumerate(result.trials):
        rung = rungs[k // seeds]
        rows.append({**rung, "seed": t.overrides.get("seed", base_train.seed),
                     "params": t.params, "steps": t.steps, "tokens": t.tokens,
                     "flops": rung["flops_per_token"] * t.tokens,
                     "val_bpb": t.val_bpb, "status": t.status, "reason": t.reason,
                     "run_dir": result._in_dir(t.run_dir)})
    out = LadderResult(pd.DataFrame(rows), Path(out_dir) / name)
    out.save()
    return out


def _size_text(n: int) -> str:
    return f"{n / 1e6:g}M" if n >= 10**5 else f"{n / 1e3:g}K"
