"""Generation tokens/s of minlm against Hugging Face transformers on the same weights, and
against minlm without its KV cache, side by side in one process.

Greedy decoding of 256 new tokens after the same prompt, at batch 1 and batch 8 (the prompt
repeated), on the CPU. transformers runs ``LlamaForCausalLM.generate`` (its default dynamic KV
cache) on a copy of the minlm weights (``minlm.interop.to_hf_llama``); the greedy tokens of
both are checked to be identical before anything is timed. Contenders are timed in
alternating rounds so that machine noise hits them alike; each figure is the median round.

    python bench/generate.py --quick        # llama-1m only, 2 rounds (about a minute)
    python bench/generate.py                # llama-1m and llama-5m, 3 rounds

At batch 1, llama.cpp (``llama-cpp-python``, when installed) runs the same weights exported
as an f32 GGUF file (``minlm.export``) with the same number of threads: the speed a user would
otherwise pick on a CPU. Its greedy tokens are checked against minlm's too.

Models with no ``transformers`` counterpart here (``--own``: mamba-1m, griffin-1m by default)
get a row each: minlm's tokens/s with its cache (recurrent state) and the speed-up over
recomputing the context every token.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from minlm import LM, ModelConfig
from minlm.generate import generate_ids
from minlm.interop import to_hf_llama
from minlm.tokenizer import load_tokenizer, shipped_tokenizer_path

PROMPT = "Once upon a time, there was a little girl named Lily. She loved to"


def contenders(ours: LM, theirs, new_tokens: int) -> dict:
    """name -> function(idx) returning the (B, T + new_tokens) ids."""
    def hf(idx):
        return theirs.generate(idx, attention_mask=torch.ones_like(idx), do_sample=False,
                               max_new_tokens=new_tokens, pad_token_id=0)

    return {
        "minlm": lambda idx: generate_ids(ours, idx, new_tokens, temperature=0),
        "transformers": hf,
        "minlm, cache via LM.forward": lambda idx: _unfused(ours, idx, new_tokens),
        "minlm without cache": lambda idx: generate_ids(ours, idx, new_tokens, temperature=0,
                                                         use_cache=False),
    }


def llama_cpp_contender(ours: LM, preset: str, new_tokens: int, threads: int, folder: str):
    """A function(idx) running llama.cpp on ``ours`` exported as f32 GGUF (batch 1), or None
    when llama-cpp-python is not installed."""
    try:
        import llama_cpp
    except ImportError:
        print("  (llama.cpp row skipped: pip install llama-cpp-python)")
        return None
    from types import SimpleNamespace

    from minlm.export import export_gguf

    tok = load_tokenizer(shipped_tokenizer_path(ours.config.vocab_size))
    run = SimpleNamespace(model=ours, model_config=ours.config, tokenizer=tok, name=preset)
    path = export_gguf(run, f"{folder}/{preset}.gguf", dtype="f32")
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ours.config.block_size, n_batch=512,
                          n_threads=threads, n_threads_batch=threads, verbose=False)

    def run_llama(idx):
        prompt = idx[0].tolist()
        out = []
        for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0,
                              repeat_penalty=1.0, reset=True):
            out.append(t)
            if len(out) == new_tokens:
                break
        return torch.tensor([prompt + out])

    return run_llama


def _unfused(model, idx, new_tokens):
    from minlm.generate import TokenStream

    s = TokenStream(model, idx, new_tokens, temperature=0, fast=False)
    for _ in s:
        pass
    return s.tokens


def measure(runs: dict, idx: torch.Tensor, rounds: int) -> dict[str, float]:
    """Median seconds per generation of each contender, alternating round by round."""
    times: dict[str, list[float]] = {name: [] for name in runs}
    with torch.inference_mode():
        for _ in range(rounds):
            for name, run in runs.items():
                start = time.perf_counter()
                run(idx)
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(t) for name, t in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--presets", nargs="*", default=["llama-1m", "llama-5m"])
    p.add_argument("--batch-sizes", nargs="*", type=int, default=[1, 8])
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads for both (default 1: one token at a time of a small "
                        "model gains nothing from more, and a shared CPU makes them wait)")
    p.add_argument("--own", nargs="*", default=["mamba-1m", "griffin-1m"],
                   help="presets timed against minlm without cache only (no HF counterpart)")
    p.add_argument("--quick", action="store_true", help="llama-1m only, 2 rounds")
    args = p.parse_args()
    if args.quick:
        args.presets, args.rounds = ["llama-1m"], 2
    torch.set_num_threads(args.threads)
    import transformers

    print(f"torch {torch.__version__}, transformers {transformers.__version__}, "
          f"{torch.get_num_threads()} thread(s), CPU, greedy, {args.new_tokens} new tokens, "
          f"median of {args.rounds} alternating rounds")
    import tempfile

    folder = tempfile.mkdtemp(prefix="minlm-bench-gguf-")
    for preset in args.presets:
        ours, prompt = model_and_prompt(preset, args.new_tokens)
        cfg = ours.config
        theirs = to_hf_llama(ours)
        llama = llama_cpp_contender(ours, preset, args.new_tokens, args.threads, folder)
        print(f"\n{preset}: {ours.num_params():,} params, block {cfg.block_size}, "
              f"prompt {len(prompt)} tokens")
        for B in args.batch_sizes:
            idx = torch.tensor([prompt] * B)
            runs = contenders(ours, theirs, args.new_tokens)
            if B == 1 and llama is not None:
                runs["llama.cpp (f32 GGUF)"] = llama
            with torch.inference_mode():
                outs = {name: run(idx) for name, run in runs.items()}  # warm-up and check
            ref = outs["minlm"]
            same = {name: torch.equal(out, ref) for name, out in outs.items()}
            if not all(same.values()):
                raise SystemExit(f"greedy tokens differ from minlm: {same}")
            seconds = measure(runs, idx, args.rounds)
            tps = {name: B * args.new_tokens / s for name, s in seconds.items()}
            print(f"  batch {B} (greedy tokens identical across all {len(runs)}):")
            for name, v in tps.items():
                print(f"    {name:<30} {v:>9,.0f} tokens/s")
            print(f"    ratio minlm / transformers:    {tps['minlm'] / tps['transformers']:.2f}x")
            print(f"    cache speed-up (vs no cache):  "
                  f"{tps['minlm'] / tps['minlm without cache']:.2f}x")
            if "llama.cpp (f32 GGUF)" in tps:
                print(f"    ratio minlm / llama.cpp:       "
                      f"{tps['minlm'] / tps['llama.cpp (f32 GGUF)']:.2f}x")
    for preset in args.own:
        own_preset(preset, args)


def model_and_prompt(preset: str, new_tokens: int) -> tuple[LM, list[int]]:
    """A seeded model of ``preset`` and the prompt's ids in its shipped tokenizer, with room
    for prompt + new tokens, so no contender ever slides or crops its context."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset(preset)
    tok = load_tokenizer(shipped_tokenizer_path(cfg.vocab_size))
    prompt = [tok.bos_id] + tok.encode(PROMPT)
    cfg = cfg.replace(block_size=max(cfg.block_size, len(prompt) + new_tokens))
    return LM(cfg).eval(), prompt


def own_preset(preset: str, args) -> None:
    """minlm with its cache or recurrent state against recomputing, at batch 1."""
    model, prompt = model_and_prompt(preset, args.new_tokens)
    idx = torch.tensor([prompt])
    runs = {"minlm": lambda i: generate_ids(model, i, args.new_tokens, temperature=0),
            "minlm without cache": lambda i: generate_ids(model, i, args.new_tokens,
                                                          temperature=0, use_cache=False)}
    with torch.inference_mode():
        outs = {name: run(idx) for name, run in runs.items()}
    if not torch.equal(outs["minlm"], outs["minlm without cache"]):
        raise SystemExit(f"{preset}: greedy tokens differ between cached and uncached decoding")
    seconds = measure(runs, idx, args.rounds)
    tps = {name: args.new_tokens / s for name, s in seconds.items()}
    print(f"\n{preset}: {model.num_params():,} params, batch 1 (greedy tokens identical):")
    print(f"    minlm (state/cache)  {tps['minlm']:>9,.0f} tokens/s, "
          f"{tps['minlm'] / tps['minlm without cache']:.2f}x recomputing the context")


if __name__ == "__main__":
    main()
