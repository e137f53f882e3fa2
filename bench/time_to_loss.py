"""Wall time for llama-1m to reach a validation bits-per-byte target: minlm's best recipe
against a plain nanoGPT-style recipe (AdamW, lr 1e-3, cosine, fp32, eager), in one run.

Both train through ``minlm.train.train`` on the same data, batches and evaluation windows,
and stop at the first evaluation at or under the target. Prints both times and the ratio.

    MINLM_DATA_DIR=../shared/data python bench/time_to_loss.py --quick
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from minlm import ModelConfig, TrainConfig
from minlm.train import train, use_bf16

PLAIN = dict(optimizer="adamw", lr=1e-3, precision="fp32", compile=False, warmup_iters=100,
             schedule="cosine", batch_size=32)
BEST = dict(optimizer="muon", lr=4e-3, precision="auto", compile=False, warmup_iters=50,
            schedule="cosine", batch_size=32)


def time_to_target(name: str, recipe: dict, target: float, minutes: float, out: str) -> dict:
    cfg = TrainConfig(run_name=name, out_dir=out, max_iters=100_000, max_minutes=minutes,
                      eval_interval=50, eval_iters=10, log_interval=10,
                      checkpoint_interval=100_000, verbose=False, stop_at_bpb=target, **recipe)
    result = train(ModelConfig.from_preset("llama-1m"), cfg)  # the engine stops at the target
    reached = result.target_reached or {}
    return {"recipe": name, "reached": bool(reached),
            "seconds": reached.get("elapsed_s", result.elapsed_s),
            "step": reached.get("step", result.step), "val_bpb": reached.get("val_bpb", result.val_bpb)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=1.5, help="validation bits per byte to reach")
    p.add_argument("--minutes", type=float, default=12, help="budget per recipe (also its schedule)")
    p.add_argument("--quick", action="store_true", help="target 1.9 bits/byte, 4 minutes each")
    args = p.parse_args()
    if args.quick:
        args.target, args.minutes = 1.9, 4.0
    out = tempfile.mkdtemp(prefix="minlm-ttl-")
    rows = [time_to_target("plain", PLAIN, args.target, args.minutes, out),
            time_to_target("best", BEST, args.target, args.minutes, out)]
    print(f"\nllama-1m to {args.target} val bits/byte (budget {args.minutes} min each):")
    for r in rows:
        status = "reached" if r["reached"] else "NOT reached"
        print(f"  {r['recipe']:<6} {status:<12} {r['seconds']:7.1f} s  step {r['step']:>5}  "
              f"val bpb {r['val_bpb']:.4f}")
    if all(r["reached"] for r in rows):
        print(f"  ratio best / plain time: {rows[1]['seconds'] / rows[0]['seconds']:.2f}")
    auto = "bf16" if use_bf16("auto", torch.device("cpu")) else "fp32"
    print("  plain:", PLAIN, "\n  best: ", BEST, f"(precision=auto is {auto} on this CPU)")


if __name__ == "__main__":
    main()
