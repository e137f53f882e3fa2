"""``python -m minlm prepare`` throughput (MB of text per second) with 1 worker and with every
core, and its peak resident memory (main process and workers together) at two input sizes.

The inputs are the shared TinyStories training text concatenated with itself until each
size is reached, in a temporary folder that is removed afterwards (never commit it). Each
measurement runs the real command in a subprocess; a sampler sums the proportional set size
(PSS: shared pages split between the processes sharing them) of that process tree every 50 ms. Targets: throughput grows with cores; peak memory at the large size is
within 1.5x of the small one and under 1 GB (memory stays flat whatever the source size).

    MINLM_DATA_DIR=../shared/data python bench/prepare.py --quick   # 20 and 100 MB
    MINLM_DATA_DIR=../shared/data python bench/prepare.py           # 100 MB and 1 GB

On a shared machine the throughput figures move with the others' load; the ratio of
1 worker to all cores is measured back to back on the same input, so it is the figure to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def build_input(src: Path, dest: Path, mb: int) -> int:
    """``src`` repeated (whole copies, then a cut at a document boundary) to ``mb`` MB."""
    text = src.read_bytes()
    want = mb * 1_000_000
    with open(dest, "wb") as f:
        written = 0
        while written + len(text) <= want:
            f.write(text)
            written += len(text)
        rest = text[:want - written]
        cut = rest.rfind(b"<|endoftext|>\n")
        if cut > 0:
            f.write(rest[:cut + len(b"<|endoftext|>\n")])
            written += cut + len(b"<|endoftext|>\n")
    return written


def tree_memory(proc: psutil.Process) -> int:
    """Proportional set size (PSS) of a process and its children: forked workers share the
    parent's pages (torch, the tokenizer), which a plain RSS sum would count once per worker."""
    total = 0
    for p in [proc] + proc.children(recursive=True):
        try:
            total += p.memory_full_info().pss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


def measure(src: Path, out: Path, tokenizer: str, workers: int) -> dict:
    cmd = [sys.executable, "-m", "minlm", "prepare", str(src), "--tokenizer", tokenizer,
           "--out", str(out), "--workers", str(workers)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ps, peak, stop = psutil.Process(proc.pid), [0], threading.Event()

    def sample():
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], tree_memory(ps))
            except psutil.NoSuchProcess:
                return
            time.sleep(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    _, err = proc.communicate()
    seconds = time.perf_counter() - start
    stop.set()
    sampler.join()
    if proc.returncode:
        raise SystemExit(f"prepare failed ({proc.returncode}): {err[-2000:]}")
    meta = json.loads((out / "meta.json").read_text())
    n_bytes = sum(meta["bytes"].values())
    return {"workers": workers, "MB": n_bytes / 1e6, "seconds": seconds,
            "MB_per_s": n_bytes / 1e6 / seconds,
            "tokens_per_s": sum(meta["tokens"].values()) / seconds, "peak_MB": peak[0] / 1e6}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="20 MB and 100 MB instead")
    ap.add_argument("--tokenizer", default="tinystories-4096")
    ap.add_argument("--large-workers-only", action="store_true",
                    help="at the large size, time only the all-cores run (saves minutes)")
    args = ap.parse_args()
    data_dir = Path(os.environ.get("MINLM_DATA_DIR", REPO.parent / "shared" / "data"))
    src = data_dir / "tinystories" / "train.txt"
    small, large = (20, 100) if args.quick else (100, 1000)
    cores = os.cpu_count() or 1
    print(f"{cores} cores, tokenizer {args.tokenizer}, input: {src} repeated; "
          f"load average now {os.getloadavg()[0]:.1f} (a shared machine moves the timings)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="minlm-bench-prepare-") as tmp:
        tmp = Path(tmp)
        for mb in (small, large):
            text = tmp / f"input-{mb}MB.txt"
            build_input(src, text, mb)
            worker_counts = [cores] if (mb == large and args.large_workers_only) else [1, cores]
            for w in worker_counts:
                r = measure(text, tmp / f"out-{mb}-{w}", args.tokenizer, w)
                r["size"] = f"{mb} MB"
                rows.append(r)
                print(f"{r['size']:>8} workers={w}: {r['MB_per_s']:6.2f} MB/s "
                      f"({r['tokens_per_s']:,.0f} tokens/s, {r['seconds']:.1f} s), "
                      f"peak memory (PSS) {r['peak_MB']:.0f} MB", flush=True)
                for f in (tmp / f"out-{mb}-{w}").glob("*"):
                    f.unlink()
            text.unlink()

    def pick(size, w):
        return next((r for r in rows if r["size"] == f"{size} MB" and r["workers"] == w), None)

    one, alln = pick(small, 1), pick(small, cores)
    scale = alln["MB_per_s"] / one["MB_per_s"]
    peak_small = max(r["peak_MB"] for r in rows if r["size"] == f"{small} MB")
    peak_large = max(r["peak_MB"] for r in rows if r["size"] == f"{large} MB")
    print(f"scaling 1 -> {cores} workers at {small} MB: x{scale:.2f} "
          f"({'grows' if scale > 1 else 'does NOT grow'} with cores)")
    print(f"peak memory (PSS) {large} MB / {small} MB: x{peak_large / peak_small:.2f} "
          f"(target <= 1.5), {large} MB peak {peak_large:.0f} MB (target < 1000 MB)")


if __name__ == "__main__":
    main()
