"""The spread of every float comparison the tests make against a recording or another
implementation, across CPU kernels and thread counts: the figures the tolerances in the
tests are set from (each tolerance's comment cites them).

Float sums differ with the order of their terms, and the order differs with the vector width
of the kernel (``ATEN_CPU_CAPABILITY``: ``default`` is the scalar kernel, ``avx2``,
``avx512``) and the number of threads, so a tolerance taken from one machine fails on another.
Each setting runs in a process of its own (the capability is read when torch loads):

    python bench/numerics_spread.py            # threads 1, 2, 3 x capability default, avx2

It prints, per check, the largest max |delta| under each setting and over all of them. The
checks are the tests' own (their helpers are imported from tests/), so what is measured is
what is asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SETTINGS = [(cap, threads) for cap in ("default", "avx2") for threads in (1, 2, 3)]


def measure() -> dict[str, float]:
    """Max |delta| of each check in this process (one capability, one thread count)."""
    import torch

    sys.path.insert(0, str(ROOT / "tests"))
    import test_generate
    import test_mixers
    import test_parity
    from safetensors.torch import load_file

    from minlm.interop import to_hf_gpt2, to_hf_llama
    from minlm.runs import load_run

    out: dict[str, float] = {}

    def worst(key: str, value: float) -> None:
        out[key] = max(out.get(key, 0.0), float(value))

    # shipped models against tests/golden/shipped_logits.safetensors (test_model.py)
    recorded = load_file(ROOT / "tests" / "golden" / "shipped_logits.safetensors")
    for name in sorted({k.split(".")[0] for k in recorded}):
        run = load_run(ROOT / "trained_models" / name)
        with torch.no_grad():
            logits = run.model(recorded[f"{name}.idx"])[0][:, :, :64]
        worst(f"shipped logits: {name}", (logits - recorded[f"{name}.logits"]).abs().max())

    # parity with transformers (test_parity.py, the same inputs as the tests draw)
    for overrides in ({}, dict(n_kv_heads=1), dict(n_kv_heads=0, rope_theta=500.0),
                      dict(tie_embeddings=False)):
        model = test_parity._perturbed("llama-1m", **overrides)
        hf = to_hf_llama(model)
        idx = torch.randint(0, model.config.vocab_size, (2, 48))
        with torch.no_grad():
            worst("parity: llama vs transformers", (model(idx)[0] - hf(idx).logits).abs().max())
    model = test_parity._perturbed("gpt2-1m")
    hf = to_hf_gpt2(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 48))
    with torch.no_grad():
        worst("parity: gpt2 vs transformers", (model(idx)[0] - hf(idx).logits).abs().max())

    # cached decoding against recomputation (test_generate.py and test_mixers.py)
    for variant, kw in test_generate.VARIANTS.items():
        model = test_generate.tiny(**kw)
        prompt = torch.randint(0, 64, (2, 7))
        _, ref = test_generate.run_stream(model, prompt, 30, use_cache=False)
        for flag in (True, False):
            _, logits = test_generate.run_stream(model, prompt, 30, fast=flag)
            worst("cached == full: attention variants", (logits - ref).abs().max())
    for kind, name, opts in test_mixers.CASES:
        model = test_mixers.build(kind, name, opts, perturb=True)
        prompt = torch.randint(0, 64, (2, 7))
        _, ref = test_mixers._stream(model, prompt, 30, use_cache=False)
        for flag in (True, False):
            _, logits = test_mixers._stream(model, prompt, 30, fast=flag)
            worst("cached == full: every mixer", (logits - ref).abs().max())

    # the fast switch on a whole training step (test_fast.py)
    import test_fast

    (l_on, g_on), (l_off, g_off) = test_fast.llama_step_with_and_without_tricks()
    worst("fast == reference: llama loss", (l_on - l_off).abs())
    # as assert_close(rtol, atol) reads it: the excess over rtol * |reference|
    worst("fast == reference: llama grads, |delta| - 1e-4 |ref|",
          max(((g_on[n] - g_off[n]).abs() - 1e-4 * g_off[n].abs()).max() for n in g_on))
    return out


def main() -> None:
    if "--child" in sys.argv:
        import torch

        torch.manual_seed(0)
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
        print("RESULT " + json.dumps({"capability": torch.backends.cpu.get_cpu_capability(),
                                      "figures": measure()}))
        return
    table: dict[str, dict[str, float]] = {}
    for cap, threads in SETTINGS:
        env = {**os.environ, "ATEN_CPU_CAPABILITY": cap, "OMP_NUM_THREADS": str(threads),
               "MINLM_FAST": "1"}
        done = subprocess.run([sys.executable, __file__, "--child"], env=env, cwd=ROOT,
                              capture_output=True, text=True, check=True)
        line = next(ln for ln in done.stdout.splitlines() if ln.startswith("RESULT "))
        result = json.loads(line[len("RESULT "):])
        label = f"{cap}->{result['capability']}/{threads}t"
        for check, value in result["figures"].items():
            table.setdefault(check, {})[label] = value
        print(f"measured {label}", flush=True)
    labels = list(next(iter(table.values())))
    print(f"\n{'check':58s} " + " ".join(f"{lb:>16s}" for lb in labels) + f" {'max':>9s}")
    for check, row in table.items():
        print(f"{check:58s} " + " ".join(f"{row[lb]:16.2e}" for lb in labels)
              + f" {max(row.values()):9.2e}")


if __name__ == "__main__":
    main()
