"""Every seed-family preset trained for the same wall-clock budget on TinyStories.

Prints one row per preset: parameters, training tokens/s on this machine, and validation
bits per byte (on the whole of held-out windows used by the trainer) after the budget.
Run:  MINLM_DATA_DIR=../shared/data python bench/presets.py --seconds 90
"""

from __future__ import annotations

import argparse
import tempfile

import pandas as pd

from minlm import ModelConfig, TrainConfig
from minlm.runs import read_log
from minlm.train import train

PRESETS = ["gpt2-1m", "llama-1m", "grok-1m", "alilama-2m", "matmulfree-1m", "bitnet-1m",
           "moe-1m", "lillm-39m"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=90, help="training budget per preset")
    p.add_argument("--presets", nargs="*", default=PRESETS)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--block-size", type=int, default=128, help="context used for every preset")
    p.add_argument("--quick", action="store_true", help="10 s per preset, first 500 documents")
    args = p.parse_args()
    seconds = 10 if args.quick else args.seconds
    rows = []
    out = tempfile.mkdtemp(prefix="minlm-presets-")
    for name in args.presets:
        model_cfg = ModelConfig.from_preset(name, block_size=args.block_size)
        cfg = TrainConfig(preset=name, run_name=name, out_dir=out, max_iters=100_000,
                          max_minutes=seconds / 60, batch_size=args.batch_size, lr=2e-3,
                          warmup_iters=20, eval_interval=100_000, eval_iters=20, log_interval=10,
                          checkpoint_interval=100_000, max_docs=500 if args.quick else 0,
                          verbose=False)
        result = train(model_cfg, cfg)
        log = read_log(result.run_dir)
        tps = log["tokens_per_s"].dropna()
        rows.append({"preset": name, "params": _params(result.run_dir),
                     "vocab": model_cfg.vocab_size, "steps": result.step,
                     "tokens": result.tokens, "tokens_per_s": round(tps.iloc[1:].median() if len(tps) > 1 else tps.median()),
                     "val_bpb": round(result.val_bpb, 4)})
        print(rows[-1], flush=True)
    df = pd.DataFrame(rows)
    print(f"\nEach preset trained {seconds:.0f} s (batch {args.batch_size} x {args.block_size} "
          "tokens, AdamW lr 2e-3, cosine over the time budget), fp32 on this CPU:\n")
    print(df.to_string(index=False))


def _params(run_dir) -> int:
    import json

    return json.loads((run_dir / "train_config.json").read_text())["meta"]["params"]


if __name__ == "__main__":
    main()
