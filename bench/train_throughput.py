"""Training tokens/s of minlm against Hugging Face transformers on the same model, side by side.

The same weights (copied with ``minlm.interop``), the same TinyStories batches, the same
AdamW settings and the same loss; they are timed step by step in alternation in one process
so that machine noise hits them alike. Also compares minlm fp32 vs bf16 autocast and eager vs
``torch.compile``. Prints tokens/s and ratios.

    MINLM_DATA_DIR=../shared/data python bench/train_throughput.py --quick
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import time

import torch
import torch.nn.functional as F

from minlm import LM, ModelConfig
from minlm.data import get_batch
from minlm.prepare import prepare
from minlm.interop import to_hf_gpt2, to_hf_llama
from minlm.tokenizer import shipped_tokenizer_path


def logits_loss(forward):
    """The textbook loss: full logits, upcast, cross-entropy (what transformers computes)."""
    def loss(x, y):
        logits = forward(x)
        return F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), y.reshape(-1))
    return loss


def make_step(loss_fn, params, bf16: bool):
    opt = torch.optim.AdamW(params, lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1)
    ctx = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if bf16 else contextlib.nullcontext

    def step(x, y):
        with ctx():
            loss = loss_fn(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def measure(contenders: dict, batches, steps: int, tokens_per_step: int) -> dict:
    """Alternate the contenders step by step; returns tokens/s for each.

    Step-by-step alternation keeps slow drifts of a shared machine (other tenants, clock)
    out of the ratios; each ratio below compares contenders timed in the same loop.
    """
    spent = {name: 0.0 for name in contenders}
    it = itertools.cycle(batches)
    for step in contenders.values():  # warm-up (and compile) outside the timing
        for _ in range(2):
            step(*next(it))
    for _ in range(steps):
        for name, step in contenders.items():
            start = time.perf_counter()
            step(*next(it))
            spent[name] += time.perf_counter() - start
    return {n: steps * tokens_per_step / s for n, s in spent.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=["llama-1m", "gpt2-1m"])
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=24, help="timed steps per contender")
    p.add_argument("--compile", action="store_true", help="also time minlm under torch.compile")
    p.add_argument("--quick", action="store_true", help="9 timed steps per contender")
    args = p.parse_args()
    if args.quick:
        args.steps = 9
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch_size}")
    for preset in args.presets:
        cfg = ModelConfig.from_preset(preset)
        shards = prepare("tinystories", str(shipped_tokenizer_path(cfg.vocab_size)), max_docs=2000,
                         verbose=False)
        gen = torch.Generator().manual_seed(0)
        need = (args.steps + 2) * 5  # reused round-robin by every group
        batches = [get_batch(shards.train, args.batch_size, cfg.block_size, gen) for _ in range(need)]
        torch.manual_seed(0)
        ours = LM(cfg)
        to_hf = to_hf_llama if cfg.position == "rope" else to_hf_gpt2
        theirs, theirs_compiled = to_hf(ours).train(), to_hf(ours).train()
        copies = {}
        for name in ("unfused", "bf16", "compiled"):
            copies[name] = LM(cfg)
            copies[name].load_state_dict(ours.state_dict())
        # minlm as its trainer runs it: head and loss fused (model(x, y, return_logits=False))
        trainer_loss = lambda m: lambda x, y: m(x, y, return_logits=False)[1]  # noqa: E731
        minlm_fp32 = make_step(trainer_loss(ours), list(ours.parameters()), False)
        tokens = args.batch_size * cfg.block_size
        # each group is timed in its own alternating loop; its ratios compare within it
        groups = [{
            "minlm fp32": minlm_fp32,
            "transformers fp32": make_step(logits_loss(lambda x: theirs(x).logits),
                                           list(theirs.parameters()), False),
            "minlm fp32 unfused": make_step(logits_loss(lambda x: copies["unfused"](x)[0]),
                                            list(copies["unfused"].parameters()), False),
        }, {
            "minlm fp32": minlm_fp32,
            "minlm bf16": make_step(trainer_loss(copies["bf16"]), list(copies["bf16"].parameters()),
                                    True),
        }]
        if args.compile:  # both libraries compiled, in the main loop so they compare directly
            fast, their_fast = torch.compile(copies["compiled"]), torch.compile(theirs_compiled)
            groups[0]["minlm fp32 compiled"] = make_step(
                trainer_loss(fast), list(copies["compiled"].parameters()), False)
            groups[0]["transformers compiled"] = make_step(
                logits_loss(lambda x: their_fast(x).logits), list(theirs_compiled.parameters()),
                False)
        print(f"\n{preset} ({ours.num_params():,} params, block {cfg.block_size}):")
        rel = {}  # tokens/s relative to minlm fp32 timed in the same loop
        for i, group in enumerate(groups, 1):
            measured = measure(group, batches, args.steps, tokens)
            print(f"  loop {i}:")
            for name, v in measured.items():
                print(f"    {name:<24} {v:>10,.0f} tokens/s")
            ours_here = measured.pop("minlm fp32")
            rel.update({name: v / ours_here for name, v in measured.items()})
        print(f"  ratio minlm / transformers (fp32): {1 / rel['transformers fp32']:.2f}x")
        print(f"  ratio fused / unfused loss:        {1 / rel['minlm fp32 unfused']:.2f}x")
        print(f"  ratio bf16 / fp32 (minlm):         {rel['minlm bf16']:.2f}x")
        if args.compile:
            print(f"  ratio compiled / eager (minlm):    {rel['minlm fp32 compiled']:.2f}x")
            print(f"  ratio minlm / transformers, both compiled: "
                  f"{rel['minlm fp32 compiled'] / rel['transformers compiled']:.2f}x")


if __name__ == "__main__":
    main()
