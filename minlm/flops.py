"""Model FLOPs per token and the device's peak, for model FLOPs utilisation (MFU).

FLOPs per token follow the PaLM appendix: 6 x (parameters in matmuls) for forward and
backward, plus 3 x the forward FLOPs each layer's token mixer declares in its registration
beyond its weights (attention: 4 x heads x head size x context for scores and weighted sum,
hence PaLM's 12 x layers x heads x head size x context). Peaks: a
table of dense bf16/fp32 figures for common GPUs, and for CPUs a short matmul probe at
start-up whose result is cached per machine.
"""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from minlm.config import ModelConfig
from minlm.model import LM

# dense peak FLOP/s by device-name substring: (bf16, fp32); from the vendors' data sheets
GPU_PEAKS = {
    "H200": (989e12, 67e12), "H100": (989e12, 67e12), "A100": (312e12, 19.5e12),
    "A10G": (125e12, 31.2e12), "L40S": (362e12, 91.6e12), "L4": (121e12, 30.3e12),
    "A6000": (155e12, 38.7e12), "4090": (165e12, 82.6e12), "3090": (71e12, 35.6e12),
    "V100": (125e12, 15.7e12), "T4": (65e12, 8.1e12),
}


def flops_per_token(cfg: ModelConfig, n_params_matmul: int | None = None) -> float:
    """Training FLOPs (forward + backward) per token of context ``cfg.block_size``: three
    forward passes' worth (the backward costs two)."""
    return 3 * forward_flops_per_token(cfg, cfg.block_size, n_params_matmul)


def forward_flops_per_token(cfg: ModelConfig, T: int,
                            n_params_matmul: int | None = None) -> float:
    """Forward FLOPs per token at context ``T``: 2 per matmul parameter plus the token
    mixers' declared work (what a trace of a T-token forward shows as its total, but for the
    parameters outside linear layers, which this PaLM-style count takes as matmul weights)."""
    if n_params_matmul is None:
        n_params_matmul = LM.count_params(cfg, matmul=True)  # lookups cost no matmul
    return 2 * n_params_matmul + mixer_flops_per_token(cfg, T)


def mixer_flops_per_token(cfg: ModelConfig, T: int) -> float:
    """Forward FLOPs per token of every layer's token mixer(s) beyond their weight matmuls,
    at context ``T``, as each mixer's registration declares them."""
    from minlm.modules.block import layer_layouts
    from minlm.modules.registry import mixer_spec

    total = 0.0
    for layout in layer_layouts(cfg):
        for step in (p for group in layout for s in group for p in s.split("|")):
            if step not in ("norm", "mlp", "moe", "+"):
                total += mixer_spec(cfg.mixer if step == "mixer" else step).flops(cfg, T)
    return total


def _cache_file() -> Path:
    root = Path(os.environ.get("MINLM_CACHE_DIR", Path.home() / ".cache" / "minlm"))
    return root / "peak_flops.json"


def _read_cache() -> dict:
    try:
        cache = json.loads(_cache_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}
    return cache if isinstance(cache, dict) else {}


def _write_cache(cache: dict) -> None:
    path = _cache_file()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(cache, indent=1))
    except OSError:
        pass  # a read-only home only costs a re-measure next time


def _key(dtype: torch.dtype, threads: int) -> str:
    return f"{platform.node()}|{platform.processor()}|{threads}|{dtype}"


def _probe(dtype: torch.dtype, seconds: float, bursts: int = 5) -> float:
    """The best of several short matmul bursts: other work on the machine only slows a burst
    down, so the fastest one is the closest to what the CPU does on a quiet moment."""
    n = 512
    # a private generator: the probe must not move the global RNG, or a run that measures
    # the peak would draw different dropout masks from one that found it in the cache
    gen = torch.Generator().manual_seed(0)
    a, b = (torch.randn(n, n, generator=gen).to(dtype) for _ in range(2))
    a @ b  # warm up
    best = 0.0
    for _ in range(bursts):
        count, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / bursts or count == 0:
            a @ b
            count += 1
        best = max(best, 2 * n**3 * count / (time.perf_counter() - start))
    return best


def cpu_peak(dtype: torch.dtype = torch.float32, seconds: float = 0.3,
             remeasure: bool = False) -> dict:
    """This CPU's matmul FLOP/s at the current thread count: ``{"flops", "threads",
    "source"}``, measured once and cached per machine, thread count and dtype.

    A figure measured while the machine was busy is too low (and an MFU above 1 follows), so
    a cached figure is never trusted below what fewer threads reached (more threads cannot be
    slower at their best), and ``remeasure=True`` (the trainer asks when it sees MFU > 1)
    probes again, keeping the higher of the two. bf16 is faster than fp32 on CPUs with
    AVX512-BF16 or AMX and far slower on AVX2-only ones, where PyTorch emulates it, so each
    dtype is measured, never assumed."""
    threads = torch.get_num_threads()
    key, cache = _key(dtype, threads), _read_cache()
    cached = cache.get(key)
    flops = cached.get("flops", 0.0) if isinstance(cached, dict) else float(cached or 0.0)
    source = "probe (cached)"
    if not flops or remeasure:
        measured = _probe(dtype, seconds * (3 if remeasure else 1))
        source = "probe, re-measured" if remeasure else "probe"
        flops = max(flops, measured)
    fewer = [v.get("flops", 0.0) if isinstance(v, dict) else float(v)
             for k, v in cache.items()
             if k.rsplit("|", 2)[0] == key.rsplit("|", 2)[0] and k.endswith(f"|{dtype}")
             and k.split("|")[-2].isdigit() and int(k.split("|")[-2]) < threads]
    if fewer and max(fewer) > flops:  # measured on a busy moment: fewer threads did better
        flops, source = max(fewer), source + ", raised to the best at fewer threads"
    if not isinstance(cached, dict) or cached.get("flops") != flops:
        cache[key] = {"flops": flops, "threads": threads, "source": source,
                      "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_cache(cache)
    return {"flops": flops, "threads": threads, "source": source}


def cpu_peak_flops(dtype: torch.dtype = torch.float32, seconds: float = 0.3) -> float:
    """Measured matmul FLOP/s of this CPU at the current thread count (see ``cpu_peak``)."""
    return cpu_peak(dtype, seconds)["flops"]


def raise_cpu_peak(dtype: torch.dtype, flops: float) -> None:
    """Record that this CPU reached ``flops`` at the current thread count (a run's own rate
    above its probe's), so the cached peak is not trusted below it again."""
    threads = torch.get_num_threads()
    key, cache = _key(dtype, threads), _read_cache()
    cached = cache.get(key)
    old = cached.get("flops", 0.0) if isinstance(cached, dict) else float(cached or 0.0)
    if flops > old:
        cache[key] = {"flops": flops, "threads": threads, "source": "a run's own rate",
                      "measured": time.strftime("%Y-%m-%d %H:%M:%S")}
        _write_cache(cache)


def cpu_bf16_is_faster() -> bool:
    """Whether bf16 matmuls beat fp32 on this CPU by a clear margin (probed once, cached)."""
    return cpu_peak_flops(torch.bfloat16) > 1.2 * cpu_peak_flops(torch.float32)


def peak_flops(device: torch.device, bf16: bool) -> float | None:
    """Peak FLOP/s of ``device`` for the precision used, or None if unknown."""
    peak = device_peak(device, bf16)
    return peak["flops"] if peak else None


def device_peak(device: torch.device, bf16: bool, remeasure: bool = False) -> dict | None:
    """``{"flops", "source", ...}``: the peak MFU is measured against and where it came from
    (a run records it), or None if unknown. ``remeasure`` probes a CPU again."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for key, (p16, p32) in GPU_PEAKS.items():
            if key in name:
                return {"flops": p16 if bf16 else p32,
                        "source": f"data sheet {key} {'bf16' if bf16 else 'fp32'}"}
        return None
    if device.type == "cpu":
        return cpu_peak(torch.bfloat16 if bf16 else torch.float32, remeasure=remeasure)
    return None
