"""Each speed trick of ``minlm.fast`` against the reference code it stands in for, side by side.

Forward + backward at llama-1m shapes (batch 16 x 256 tokens, width 128, 4 heads of 32, a
2048-piece vocabulary): RMSNorm, the RoPE rotation, the head + cross-entropy; one Muon step
over llama-1m's block matrices (``torch.optim.Muon`` against minlm's fp32 steps); and one whole
llama-1m training step (forward, backward, AdamW) with ``minlm.fast`` on and off. The two
sides of each pair run in alternation, call by call, in one process, so that machine noise
hits them alike; each figure is the median call. Prints ms per call and the ratio
reference / fast (above 1: the trick is faster here). ``--chunks`` also times the fused loss at
half, the default and double its chunk size (``minlm.fast.CHUNK_ELEMENTS``); ``--scan-chunks``
mamba-1m's chunked scan at its default chunk length (cache-sized), at 1 and 16 positions, and
its step-by-step reference form.

    python bench/fast_paths.py --quick        # a few seconds
    python bench/fast_paths.py --chunks --scan-chunks   # more rounds, and the chunk sizes
"""

from __future__ import annotations

import argparse
import statistics
import time
from typing import Callable

import torch

from minlm import LM, TrainConfig, fast
from minlm.flops import cpu_bf16_is_faster
from minlm.loss import masked_cross_entropy
from minlm.modules.norm import RMSNorm
from minlm.modules.position import RoPE
from minlm.optim import Muon, _split_params, make_optimizer

B, T, C, H, D, V = 16, 256, 128, 4, 32, 2048  # llama-1m: batch, context, width, heads, head, vocab


def alternate(contenders: dict[str, Callable[[], None]], rounds: int) -> dict[str, float]:
    """Median seconds per call of each contender, called in turn ``rounds`` times (after one
    warm-up call each)."""
    times: dict[str, list[float]] = {name: [] for name in contenders}
    for fn in contenders.values():
        fn()
    for _ in range(rounds):
        for name, fn in contenders.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def switched(fn: Callable[[], None]) -> dict[str, Callable[[], None]]:
    """fn run with the switch off (the reference) and on (the trick)."""
    def run(flag):
        def call():
            with fast.use(flag):
                fn()
        return call
    return {"reference": run(False), "fast": run(True)}


def rmsnorm_pair():
    norm = RMSNorm(C)
    x = torch.randn(B, T, C, requires_grad=True)
    grad = torch.randn(B, T, C)
    return switched(lambda: norm(x).backward(grad))


def rope_pair():
    rope = RoPE(D, T)
    x = torch.randn(B, H, T, D, requires_grad=True)
    positions, grad = torch.arange(T), torch.randn(B, H, T, D)
    return switched(lambda: rope(x, positions).backward(grad))


def loss_pair():
    h = torch.randn(B, T, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.02).requires_grad_()
    y = torch.randint(0, V, (B, T))

    def step():
        if fast.enabled():
            loss = fast.fused_linear_cross_entropy(h, w, y)
        else:
            loss = masked_cross_entropy(h @ w.t(), y)
        loss.backward()
    return switched(step)


def muon_pair():
    if not hasattr(torch.optim, "Muon"):
        return None
    hidden = _split_params(LM.from_preset("llama-1m"))[0]
    for p in hidden:
        p.grad = torch.randn_like(p) * 1e-3
    ours = Muon(hidden, lr=1e-4, ns_dtype=torch.float32)
    theirs = torch.optim.Muon(hidden, lr=1e-4, adjust_lr_fn="match_rms_adamw")
    return {"reference": theirs.step, "fast": ours.step}


def training_step_pair():
    model = LM.from_preset("llama-1m")
    opt = make_optimizer(model, TrainConfig(lr=1e-4), torch.device("cpu"))
    x = torch.randint(0, V, (B, T))

    def step():
        _, loss = model(x, x, return_logits=False)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return switched(step)


def chunk_sizes() -> dict[str, Callable[[], None]]:
    h = torch.randn(B, T, C, requires_grad=True)
    w = (torch.randn(V, C) * 0.02).requires_grad_()
    y = torch.randint(0, V, (B, T))
    default = fast.CHUNK_ELEMENTS

    def at(elements):
        def call():
            fast.CHUNK_ELEMENTS = elements
            try:
                fast.fused_linear_cross_entropy(h, w, y).backward()
            finally:
                fast.CHUNK_ELEMENTS = default
        return call
    return {f"{e * 4 >> 20} MB chunks": at(e) for e in (default // 2, default, default * 2)}


def scan_chunks() -> dict[str, Callable[[], None]]:
    """mamba-1m forward+backward at batch 8 x 256 by ``scan_chunk`` (0: cache-sized, the
    default) and in the reference form."""
    x = torch.randint(0, V, (8, T))

    def at(options):
        torch.manual_seed(0)
        model = LM.from_preset("mamba-1m", mixer_options=options)
        return lambda: model(x, x, return_logits=False)[1].backward()
    return {"scan_chunk=0": at({}), "scan_chunk=1": at({"scan_chunk": 1}),
            "scan_chunk=16": at({"scan_chunk": 16}), "scan=reference": at({"scan": "reference"})}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=20, help="timed calls per contender")
    p.add_argument("--quick", action="store_true", help="5 rounds (2 for the training step)")
    p.add_argument("--chunks", action="store_true", help="also time the fused loss's chunk sizes")
    p.add_argument("--scan-chunks", action="store_true",
                   help="also time mamba-1m's scan by chunk length (seconds per call)")
    args = p.parse_args()
    rounds = 5 if args.quick else args.rounds
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; "
          f"forward+backward at B={B} T={T} C={C} H={H} D={D} V={V}; median ms per call")
    print(f"  {'trick':<28} {'reference':>10} {'fast':>10} {'ratio ref/fast':>15}")
    pairs = [("rmsnorm", rmsnorm_pair, rounds), ("rope rotation", rope_pair, rounds),
             ("head + cross-entropy", loss_pair, rounds), ("muon step (block matrices)",
                                                           muon_pair, rounds),
             ("llama-1m training step", training_step_pair, max(2, rounds // 4))]
    for name, make, n in pairs:
        torch.manual_seed(0)
        contenders = make()
        if contenders is None:
            print(f"  {name:<28} skipped: this PyTorch has no torch.optim.Muon")
            continue
        t = alternate(contenders, n)
        note = ""
        if make is muon_pair:  # minlm.fast takes the fp32 steps only where bf16 is emulated
            chosen = fast.muon_ns_dtype(not cpu_bf16_is_faster()) is not None
            note = "  (fp32 chosen on this CPU)" if chosen else "  (torch's chosen on this CPU)"
        print(f"  {name:<28} {t['reference'] * 1e3:>10.2f} {t['fast'] * 1e3:>10.2f} "
              f"{t['reference'] / t['fast']:>14.2f}x{note}")
    if args.chunks:
        t = alternate(chunk_sizes(), rounds)
        base = t[next(k for k in t if k.startswith(f"{fast.CHUNK_ELEMENTS * 4 >> 20} MB"))]
        print("  fused loss by chunk size (ratio: time / the default's):")
        for name, s in t.items():
            print(f"    {name:<26} {s * 1e3:>10.2f} ms {s / base:>8.2f}x")
    if args.scan_chunks:
        t = alternate(scan_chunks(), min(rounds, 3))
        print("  mamba-1m forward+backward at 8 x 256 (ratio: time / the default's):")
        for name, s in t.items():
            print(f"    {name:<26} {s:>10.2f} s  {s / t['scan_chunk=0']:>8.2f}x")


if __name__ == "__main__":
    main()
