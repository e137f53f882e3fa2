"""CPU speedrun: the tokens, FLOPs and minutes a recipe needs to reach a val bpb target.

It also gives the validation bits per byte the recipe ends at within a token budget, on
TinyStories by default.

A recipe is a preset plus ``key=value`` overrides of ModelConfig/TrainConfig, read exactly as
``python -m minlm train`` reads them, or a named recipe from ``minlm/recipes.json`` (more
overrides on the command line apply on top). Each entry is an ordinary run folder, trained by
``minlm.train.train``; the engine records the first evaluation at or below the target
(``target_bpb``) and, with ``--stop-at-target``, ends the run there (``stop_at_bpb``). Without
it the run goes on to the budget, which also sets the learning-rate schedule, so one run gives
both the time to the target and the final figure. Evaluations use the same fixed, evenly
spaced windows of the validation split every time; the final figure is confirmed over the
whole validation file with ``minlm.evaluate.evaluate_file`` (what ``python -m minlm eval``
prints). One row per entry is appended to a CSV, and a markdown row for bench/SPEEDRUN.md is
printed.

    MINLM_DATA_DIR=../shared/data python bench/speedrun.py --recipe shipped
    MINLM_DATA_DIR=../shared/data python bench/speedrun.py --recipe shipped schedule=wsd --name wsd
    MINLM_DATA_DIR=../shared/data python bench/speedrun.py --recipe shipped --ablate lr,warmup_iters
"""

from __future__ import annotations

import argparse
import csv
import math
import shlex
import sys
import time
from pathlib import Path

import torch

from minlm import ModelConfig, TrainConfig, recipes
from minlm.cli import _count
from minlm.data import validation_file
from minlm.errors import ConfigError, report_errors
from minlm.evaluate import evaluate_file
from minlm.flops import flops_per_token
from minlm.objectives import epochs_to_steps, pretraining_step_tokens
from minlm.runs import load_run, read_configs, read_log
from minlm.settings import canonical_item, preset_config, route_items, take_preset
from minlm.train import train

HERE = Path(__file__).resolve().parent
RECIPES = recipes.RECIPES  # minlm/recipes.json
RESULTS = HERE / "results" / "speedrun.csv"
# settings the harness owns: the budget, the evaluation schedule and the target
OWNED = {"max_iters": "--tokens", "max_minutes": "--minutes", "epochs": "--tokens",
         "eval_interval": "--eval-every", "eval_iters": "--eval-windows",
         "eval_batch_size": "--eval-windows", "target_bpb": "--target",
         "stop_at_bpb": "--target and --stop-at-target", "run_name": "--name",
         "out_dir": "--out-dir", "resume": "(nothing: every entry is a new run)"}
COLUMNS = ["date", "recipe", "preset", "params", "vocab_size", "block_size", "target_bpb",
           "reached", "steps_to_target", "tokens_to_target", "flops_to_target",
           "minutes_to_target", "steps", "tokens", "flops", "minutes", "tokens_per_s",
           "final_slice_bpb", "final_valid_bpb", "eval_windows", "valid_file", "stopped",
           "hardware", "threads", "run_dir", "command"]


def read_recipe(name: str, path: Path = RECIPES) -> tuple[str, list[str]]:
    """(preset, overrides) of a named recipe (``minlm.recipes``, which ``train --recipe`` reads)."""
    try:
        return recipes.read_recipe(name, path)
    except ConfigError as e:
        raise SystemExit(f"error: {e}") from None


def configs(preset: str, items: list[str], args, run_name: str) -> tuple[ModelConfig, TrainConfig]:
    """The configs of one entry: the overrides as ``python -m minlm train`` reads them, then
    the budget, the fixed evaluation slice and the target set by the harness."""
    preset, items = take_preset([canonical_item(i) for i in items], preset)
    model_items, train_items = route_items(items)
    for item in train_items:
        key = item.split("=", 1)[0]
        if key in OWNED:
            raise SystemExit(f"error: {item!r}: {key} is set by the speedrun; use {OWNED[key]}")
    model_cfg = preset_config(preset, model_items)
    cfg = TrainConfig(preset=preset).with_overrides(train_items)
    step_tokens = cfg.batch_size * model_cfg.block_size * cfg.grad_accum_steps
    # a batch warm-up reads fewer tokens in its first steps: count them, so the budget is met
    max_iters = epochs_to_steps(1, args.tokens, step_tokens,
                                pretraining_step_tokens(cfg, model_cfg.block_size))
    eval_batch = min(32, args.eval_windows)
    return model_cfg, cfg.replace(
        run_name=run_name, out_dir=str(args.out_dir), max_iters=max_iters,
        max_minutes=args.minutes, eval_interval=args.eval_every, eval_batch_size=eval_batch,
        eval_iters=math.ceil(args.eval_windows / eval_batch), checkpoint_interval=max_iters,
        target_bpb=args.target, stop_at_bpb=args.target if args.stop_at_target else 0.0,
        verbose=not args.quiet)


def command(label: str, preset: str, items: list[str], args) -> str:
    """The command that reruns exactly this entry (the recipe's overrides written out)."""
    parts = ["python", "bench/speedrun.py", "--name", label, "--preset", preset, *items,
             "--target", f"{args.target:g}", "--tokens", str(args.tokens)]
    if args.minutes:
        parts += ["--minutes", f"{args.minutes:g}"]
    if args.stop_at_target:
        parts.append("--stop-at-target")
    if args.eval_every != 250 or args.eval_windows != 640:
        parts += ["--eval-every", str(args.eval_every), "--eval-windows", str(args.eval_windows)]
    if args.valid:
        parts += ["--valid", str(args.valid)]
    if args.valid_docs:
        parts += ["--valid-docs", str(args.valid_docs)]
    return shlex.join(parts)


def valid_file(args, data: str) -> Path:
    return Path(args.valid) if args.valid else validation_file(data)


def run_entry(label: str, preset: str, items: list[str], args) -> dict:
    """Train one entry and measure it; returns its results row."""
    run_name = f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
    model_cfg, cfg = configs(preset, items, args, run_name)
    valid = valid_file(args, cfg.data)
    result = train(model_cfg, cfg)
    if result.exit_code:
        raise SystemExit(f"error: {label}: {result.status} (run folder {result.run_dir})")
    _, _, meta = read_configs(result.run_dir)
    log = read_log(result.run_dir)
    evals = log.dropna(subset=["val_bpb"])
    speeds = log["tokens_per_s"].dropna()  # measured between log rows, evaluations excluded
    run = load_run(result.run_dir, device=meta.get("device", "cpu"))
    whole = evaluate_file(run.model, run.tokenizer, valid, max_docs=args.valid_docs)
    per_token = flops_per_token(model_cfg)
    hit = result.target_reached or {}
    return {
        "date": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "recipe": label,
        "preset": preset, "params": meta["params"], "vocab_size": model_cfg.vocab_size,
        "block_size": model_cfg.block_size, "target_bpb": args.target, "reached": bool(hit),
        "steps_to_target": hit.get("step"), "tokens_to_target": hit.get("tokens"),
        "flops_to_target": per_token * hit["tokens"] if hit else None,
        "minutes_to_target": round(hit["elapsed_s"] / 60, 3) if hit else None,
        "steps": result.step, "tokens": result.tokens, "flops": per_token * result.tokens,
        "minutes": round(result.elapsed_s / 60, 3),
        "tokens_per_s": round(float(speeds.median()), 1) if len(speeds) else None,
        "final_slice_bpb": round(float(evals["val_bpb"].iloc[-1]), 4) if len(evals) else None,
        "final_valid_bpb": round(whole.bits_per_byte, 4),
        "eval_windows": cfg.eval_iters * cfg.eval_batch_size, "valid_file": valid.name,
        "stopped": result.stopped or "token budget", "hardware": meta.get("hardware", ""),
        "threads": torch.get_num_threads(), "run_dir": str(result.run_dir),
        "command": command(label, preset, items, args)}


def append_row(path: Path, row: dict) -> None:
    """Append ``row`` to the results CSV (header written once; another header is refused)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        if header != COLUMNS:
            raise SystemExit(f"error: --results {path} has other columns ({', '.join(header)}); "
                             "give another file")
        mode = "a"
    else:
        mode = "w"
    with open(path, mode, newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        if mode == "w":
            writer.writeheader()
        writer.writerow(row)


def _sci(x) -> str:
    return "not reached" if x is None else f"{x:.3g}"


def record_row(r: dict) -> str:
    """The row of the record table in bench/SPEEDRUN.md."""
    to = lambda k, f: "not reached" if r[k] is None else f(r[k])  # noqa: E731
    return (f"| {r['recipe']} | {r['params']:,} | {r['vocab_size']} | "
            f"{to('tokens_to_target', lambda v: f'{v / 1e6:.3g}M')} | {_sci(r['flops_to_target'])} | "
            f"{to('minutes_to_target', lambda v: f'{v:.1f}')} | {r['final_slice_bpb']} / "
            f"{r['final_valid_bpb']} | {r['tokens'] / 1e6:.3g}M | {r['hardware']} | "
            f"`{r['command']}` |")


def ablation_row(r: dict, full: dict) -> str:
    """The row of the ablation table: an entry with one override reverted, against the full."""
    delta = r["final_valid_bpb"] - full["final_valid_bpb"]
    to = "not reached" if r["tokens_to_target"] is None else f"{r['tokens_to_target'] / 1e6:.3g}M"
    return (f"| {full['recipe']} | {r['recipe'].rsplit('-no-', 1)[-1]} | {to} | "
            f"{r['final_valid_bpb']} | {delta:+.4f} | `{r['command']}` |")


def report(r: dict) -> None:
    print(f"\n{r['recipe']}: {r['preset']}, {r['params']:,} params, vocab {r['vocab_size']}, "
          f"{r['hardware']}")
    if r["reached"]:
        print(f"  target {r['target_bpb']} val bpb reached at step {r['steps_to_target']}: "
              f"{r['tokens_to_target']:,} tokens, {r['flops_to_target']:.3g} FLOPs, "
              f"{r['minutes_to_target']:.2f} min")
    else:
        print(f"  target {r['target_bpb']} val bpb not reached in {r['tokens']:,} tokens")
    print(f"  final: {r['final_slice_bpb']} bpb on the fixed slice ({r['eval_windows']} windows), "
          f"{r['final_valid_bpb']} on the whole {r['valid_file']}; {r['tokens']:,} tokens, "
          f"{r['flops']:.3g} FLOPs, {r['minutes']:.2f} min, {r['tokens_per_s'] or 0:,} tokens/s "
          f"({r['stopped']})")
    print("  record row:", record_row(r))


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="bench/speedrun.py", description=__doc__.splitlines()[0])
    p.add_argument("overrides", nargs="*", help="ModelConfig/TrainConfig settings as key=value")
    p.add_argument("--recipe", default=None, help=f"a named recipe of --recipes ({RECIPES.name})")
    p.add_argument("--recipes", type=Path, default=RECIPES, help="the JSON file of recipes")
    p.add_argument("--preset", default=None, help="model preset (default: the recipe's, else "
                   "llama-1m)")
    p.add_argument("--name", default=None, help="the entry's name (default: the recipe's, "
                   "else the preset's)")
    p.add_argument("--target", type=float, default=0.90, help="validation bits per byte to reach")
    p.add_argument("--tokens", type=_count, default=14_000_000,
                   help="training-token budget, e.g. 14M (rounded up to whole steps); it also "
                   "sets the schedule's length")
    p.add_argument("--minutes", type=float, default=0.0, help="wall-clock budget (0: none)")
    p.add_argument("--stop-at-target", action="store_true",
                   help="end at the first evaluation at or below the target")
    p.add_argument("--eval-every", type=int, default=250, help="steps between evaluations")
    p.add_argument("--eval-windows", type=int, default=640,
                   help="evenly spaced validation windows of every evaluation (the fixed slice)")
    p.add_argument("--valid", default=None, help="file the final figure is confirmed on "
                   "(default: the data's validation file, valid.txt for tinystories)")
    p.add_argument("--valid-docs", type=int, default=0, help="only its first N documents (0: all)")
    p.add_argument("--out-dir", type=Path, default=Path("runs/speedrun"),
                   help="where the run folders go")
    p.add_argument("--results", type=Path, default=RESULTS, help="CSV that gets one row per run")
    p.add_argument("--ablate", default="", help="comma-separated keys: also run the recipe "
                   "once with each of these overrides removed (its default restored)")
    p.add_argument("--quiet", action="store_true", help="no progress bar or per-eval lines")
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_intermixed_args(argv)  # key=value items may follow options
    for name in ("tokens", "eval_every", "eval_windows"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')}={getattr(args, name)} must be >= 1")
    if args.target <= 0 or args.minutes < 0 or args.valid_docs < 0:
        p.error(f"--target={args.target} must be > 0, --minutes={args.minutes} and "
                f"--valid-docs={args.valid_docs} >= 0")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    preset, items = read_recipe(args.recipe, args.recipes) if args.recipe else ("llama-1m", [])
    preset = args.preset or preset
    items = items + list(args.overrides)
    label = args.name or args.recipe or preset
    entries = [(label, items)]
    for key in (k.strip().replace("-", "_") for k in args.ablate.split(",") if k.strip()):
        kept = [i for i in items if canonical_item(i).split("=", 1)[0] != key]
        if len(kept) == len(items):
            keys = ", ".join(canonical_item(i).split("=", 1)[0] for i in items) or "none"
            raise SystemExit(f"error: --ablate {key!r} is not an override of {label}; its "
                             f"overrides: {keys}")
        entries.append((f"{label}-no-{key}", kept))
    rows = []
    for name, entry_items in entries:
        row = run_entry(name, preset, entry_items, args)
        append_row(args.results, row)
        report(row)
        rows.append(row)
    print(f"\nwrote {len(rows)} row(s) to {args.results}")
    if len(rows) > 1:
        print("ablation rows:")
        for row in rows[1:]:
            print(ablation_row(row, rows[0]))
    return 0


if __name__ == "__main__":
    sys.exit(report_errors(main, "--debug" in sys.argv))
