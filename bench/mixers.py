"""Every registered token mixer against attention (llama-1m), side by side in one run.

One preset per registered token mixer (experiments in ``experiments/`` included, found through
the registry): each preset whose ``mixer`` is not attention, plus ``llama-1m`` as the baseline
and any ``--extra`` presets (``bitnet-1m``: attention with ternary linears); a registered
mixer that no preset uses runs as ``llama-1m`` with ``mixer=<name>``. For each:

- training tokens/s (forward, backward, AdamW, the trainer's fused loss; fp32), all presets
  stepped in turn in one loop (``train_throughput.measure``) so machine noise hits them alike;
- the fraction of this machine's fp32 matmul rate the training step reaches (model FLOPs per
  token as MFU counts them x tokens/s, over a 512 x 512 matmul's FLOP/s timed in that same
  loop as one more contender);
- cached greedy decoding tokens/s at batch 1 and batch 8 (the median of alternating rounds,
  ``generate.measure``).

Each speed is also printed as a ratio to llama-1m's, measured in the same loop. One table,
also written as CSV (``--csv``, default ``bench/results/mixers.csv``).

    python bench/mixers.py --quick     # fewer steps and tokens (a few minutes on 1 thread)
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pandas as pd
import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # siblings' helpers; the repo's minlm

from generate import measure as measure_rounds  # noqa: E402
from train_throughput import make_step, measure  # noqa: E402

from minlm import LM, ModelConfig  # noqa: E402
from minlm.flops import flops_per_token  # noqa: E402
from minlm.generate import generate_ids  # noqa: E402
from minlm.modules import registry  # noqa: E402
from minlm.presets import PRESETS  # noqa: E402

BASELINE = "llama-1m"


def mixer_presets(extra: list[str]) -> dict[str, ModelConfig]:
    """preset name -> config: every preset of a non-attention mixer, llama-1m first, a
    stand-in for any registered mixer without a preset, then ``extra``."""
    for pkg in sorted(registry.EXPERIMENTS_DIR.glob("*/__init__.py")):
        registry.load_experiment(pkg.parent.name)
    configs = {BASELINE: ModelConfig.from_preset(BASELINE)}
    used = {"attention"}
    for name, fields in PRESETS.items():
        mixer = fields.get("mixer", "attention")
        if mixer != "attention":
            configs[name] = ModelConfig.from_preset(name)
            used.add(mixer)
    for name, spec in registry.mixers().items():
        if name not in used:
            configs[f"{BASELINE} mixer={name}"] = ModelConfig.from_preset(
                BASELINE, mixer=name, **spec.requires)
    for name in extra:
        configs[name] = ModelConfig.from_preset(name)
    return configs


def matmul_step(n: int = 512, repeat: int = 8):
    """A contender that runs ``repeat`` fp32 n x n matmuls; returns (step, FLOPs per call)."""
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(n, n, generator=gen), torch.randn(n, n, generator=gen)

    def step(*_):
        for _ in range(repeat):
            a @ b
    return step, 2 * n ** 3 * repeat


def training(configs: dict[str, ModelConfig], batch: int, steps: int) -> tuple[dict, float]:
    """tokens/s of each config's training step and the matmul rate (FLOP/s), one loop."""
    T = max(cfg.block_size for cfg in configs.values())
    gen = torch.Generator().manual_seed(0)
    vocab = min(cfg.vocab_size for cfg in configs.values())
    batches = [(x, torch.roll(x, -1, 1)) for x in
               (torch.randint(0, vocab, (batch, T), generator=gen) for _ in range(4))]
    contenders = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = LM(cfg).train()
        T_cfg = cfg.block_size

        def loss(x, y, model=model, T_cfg=T_cfg):
            return model(x[:, :T_cfg], y[:, :T_cfg], return_logits=False)[1]
        contenders[name] = make_step(loss, list(model.parameters()), False)
    mm, mm_flops = matmul_step()
    contenders["matmul"] = mm
    tps = measure(contenders, batches, steps, batch * T)
    # measure() counts batch * T tokens a call: the matmul made mm_flops, a shorter context less
    rate = tps.pop("matmul") / (batch * T) * mm_flops
    return {n: v * configs[n].block_size / T for n, v in tps.items()}, rate


def decoding(configs: dict[str, ModelConfig], batch: int, new_tokens: int,
             rounds: int) -> dict[str, float]:
    """Cached greedy decoding tokens/s of each config at ``batch`` rows, alternating rounds."""
    gen = torch.Generator().manual_seed(1)
    runs = {}
    for name, cfg in configs.items():
        torch.manual_seed(0)
        model = LM(cfg).eval()
        prompt = torch.randint(0, cfg.vocab_size, (batch, 16), generator=gen)
        runs[name] = (lambda i, model=model, prompt=prompt:
                      generate_ids(model, prompt, new_tokens, temperature=0))
    with torch.inference_mode():
        for run in runs.values():
            run(None)  # warm-up
    seconds = measure_rounds(runs, None, rounds)
    return {name: batch * new_tokens / s for name, s in seconds.items()}


def table(configs, train_tps, rate, decode) -> pd.DataFrame:
    rows = []
    for name, cfg in configs.items():
        row = {"preset": name, "mixer": cfg.mixer, "linear": cfg.linear,
               "params": LM.count_params(cfg), "train_tok_s": round(train_tps[name]),
               "train_x_llama": round(train_tps[name] / train_tps[BASELINE], 2),
               "matmul_frac": round(flops_per_token(cfg) * train_tps[name] / rate, 3)}
        for B, tps in decode.items():
            row[f"decode_b{B}_tok_s"] = round(tps[name])
            row[f"decode_b{B}_x_llama"] = round(tps[name] / tps[BASELINE], 2)
        rows.append(row)
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch-size", type=int, default=16, help="training batch (rows)")
    p.add_argument("--steps", type=int, default=12, help="timed training steps per preset")
    p.add_argument("--new-tokens", type=int, default=128, help="decoded tokens per round")
    p.add_argument("--rounds", type=int, default=3, help="decoding rounds per preset")
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 8], help="decoding rows")
    p.add_argument("--extra", nargs="*", default=["bitnet-1m"], help="more presets to time")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--csv", default=str(HERE / "results" / "mixers.csv"))
    p.add_argument("--quick", action="store_true", help="batch 8, 4 steps, 32 tokens, 2 rounds")
    args = p.parse_args(argv)
    if args.quick:
        args.batch_size, args.steps, args.new_tokens, args.rounds = 8, 4, 32, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    configs = mixer_presets(args.extra)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), fp32; training "
          f"batch {args.batch_size}, {args.steps} timed steps each, interleaved; decoding "
          f"{args.new_tokens} greedy tokens, median of {args.rounds} alternating rounds",
          flush=True)
    start = time.perf_counter()
    train_tps, rate = training(configs, args.batch_size, args.steps)
    print(f"  training done in {time.perf_counter() - start:.0f} s; fp32 matmul rate "
          f"{rate / 1e9:.1f} GFLOP/s", flush=True)
    decode = {B: decoding(configs, B, args.new_tokens, args.rounds) for B in args.batch_sizes}
    df = table(configs, train_tps, rate, decode)
    print(df.to_string(index=False))
    path = Path(args.csv)
    path.parent.mkdir(parents=True, exist_ok=True)
    df.to_csv(path, index=False)
    print(f"written {path}")
    return df


if __name__ == "__main__":
    main()
