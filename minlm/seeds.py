"""Several seeds of one recipe as one group, and whether a difference between two groups is
larger than the spread between seeds.

Why: two seeds of one recipe can end further apart than two ideas do, so a single run per
idea cannot say which is better. A group is sibling run folders ``<name>-s0``, ``<name>-s1``,
... (ordinary runs; seed i trains with ``seed + i``) whose ``train_config.json`` records
``group=<name>``. A comparison interpolates every run's validation curve to common token
counts and judges each pair of groups at the same count with Welch's t-test over the seeds'
figures (``scipy.stats``), the standard error of the difference as its spread.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from minlm.config import ConfigError, TrainConfig

SIGNIFICANCE = 0.05  # a difference is "larger than the seed spread" below this p-value


def check_seeds(seeds) -> int:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"seeds={seeds!r} is invalid: must be a whole number >= 1 (the "
                          "number of seeds of the recipe to train)")
    return seeds


# --- finding groups --------------------------------------------------------------------------

def group_members(name: str, runs_dir: str | os.PathLike | None = None) -> list[Path]:
    """The run folders of group ``name`` under ``runs_dir``: ``<name>-s<i>`` folders whose
    config records that group, in seed order."""
    from minlm.runs import default_runs_dir, read_record

    base = Path(runs_dir) if runs_dir is not None else default_runs_dir()
    found = []
    for d in base.glob(f"{name}-s*"):
        suffix = d.name[len(name) + 2:]
        if (suffix.isdigit() and (d / "train_config.json").is_file()
                and read_record(d)[1].group == name):
            found.append((int(suffix), d))
    return [d for _, d in sorted(found)]


def resolve_runs(runs: Sequence, runs_dir: str | os.PathLike | None = None) -> list:
    """Run folders for ``compare``: each entry is a loaded run, a run folder, a run name, or
    the name of a seed group (expanded to its members)."""
    from minlm.runs import resolve_run_dir

    out = []
    for run in runs:
        if hasattr(run, "path"):
            out.append(Path(run.path))
            continue
        try:
            out.append(resolve_run_dir(run, runs_dir))
        except ValueError as e:
            p = Path(run)  # a path's group is beside it; a bare name's in the runs folder
            members = group_members(p.name, p.parent if os.sep in str(run) else runs_dir)
            if not members:
                raise type(e)(f"{e}; nor is it a seed group (no {p.name}-s0, -s1, ... of "
                              "that group beside it)") from None
            out.extend(members)
    return out


# --- judging differences ---------------------------------------------------------------------

def curve_at(xs, ys, at) -> np.ndarray:
    """A curve (increasing ``xs``) read at ``at`` by linear interpolation: runs evaluated at
    different token counts compare at the same ones. ``at`` beyond the curve's ends is NaN."""
    xs, ys, at = np.asarray(xs, float), np.asarray(ys, float), np.asarray(at, float)
    out = np.interp(at, xs, ys)
    return np.where((at < xs[0]) | (at > xs[-1]), np.nan, out)


@dataclass
class Verdict:
    """Group ``a`` against group ``b`` at ``at`` tokens: ``diff`` = mean(a) - mean(b), its
    standard error ``stderr``, and Welch's t-test's two-sided ``p``."""

    a: str
    b: str
    at: float
    mean_a: float
    mean_b: float
    n_a: int
    n_b: int
    diff: float
    stderr: float
    p: float
    statistic: str = "Welch's t-test over seeds"

    @property
    def significant(self) -> bool:
        return self.p == self.p and self.p < SIGNIFICANCE

    @property
    def text(self) -> str:
        seeds = (f"{self.n_a} seeds each" if self.n_a == self.n_b
                 else f"{self.n_a} and {self.n_b} seeds")
        if self.n_a < 2 or self.n_b < 2:
            return (f"{self.a} vs {self.b}: {self.diff:+.4f} bpb with {seeds}; no seed spread "
                    "to judge by (train seeds=3 or more of each)")
        lower, higher = (self.a, self.b) if self.diff < 0 else (self.b, self.a)
        says = (f"larger than the seed spread ({self.statistic}, p={self.p:.2g})"
                if self.significant else f"within noise ({self.statistic}, p={self.p:.2g})")
        return (f"{lower} is lower than {higher} by {abs(self.diff):.4f} ± {self.stderr:.4f} "
                f"bpb over {seeds} at {self.at:,.0f} tokens; {says}")


def verdict(a: Sequence[float], b: Sequence[float], names: tuple[str, str] = ("A", "B"),
            at: float = math.nan) -> Verdict:
    """Whether the seeds' figures ``a`` and ``b`` (one per seed, e.g. val bpb at equal tokens)
    differ by more than their spread: Welch's t-test (unequal variances), two-sided."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if len(a) == 0 or len(b) == 0 or np.isnan(a).any() or np.isnan(b).any():
        raise ValueError(f"verdict needs one finite figure per seed of both groups; got "
                         f"{list(a)} and {list(b)}")
    diff = float(a.mean() - b.mean())
    if len(a) < 2 or len(b) < 2:
        return Verdict(names[0], names[1], at, float(a.mean()), float(b.mean()), len(a),
                       len(b), diff, math.nan, math.nan)
    from scipy import stats

    stderr = math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))
    p = float(stats.ttest_ind(a, b, equal_var=False).pvalue) if stderr > 0 else (
        1.0 if diff == 0 else 0.0)
    return Verdict(names[0], names[1], at, float(a.mean()), float(b.mean()), len(a), len(b),
                   diff, stderr, p)
