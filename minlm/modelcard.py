"""A README for a run folder: what it is, how it was trained, how good it is, what it writes.

Shipped models carry one so that someone browsing ``trained_models/`` can judge a model
without loading it. Every figure comes from the run's own record (configs, meta, log) or is
measured when the card is written (bits per byte over a whole held-out file, the samples).

    python -m minlm card llama-1m --eval ../shared/data/tinystories/valid.txt
"""

from __future__ import annotations

import os
from pathlib import Path

PROMPTS = ("Once upon a time, there was a little", "Tom and his dog went to the park. They",
           "The sun was hot, so Lily")
CHAT_MESSAGES = ("Hi! Can you tell me a fun fact about dogs?", "What should I cook for dinner tonight?",
                 "How do I make my plants grow faster?")


def model_card(run, eval_file: str | os.PathLike | None = None, prompts=PROMPTS,
               chat_messages=CHAT_MESSAGES, max_new_tokens: int = 80, seed: int = 0) -> str:
    """Markdown for ``run`` (a name, folder or loaded Run): config, data, training figures,
    bits per byte over ``eval_file`` when given, and three samples (chat replies for a
    fine-tuned chat run, story continuations otherwise) at temperature 0.7, min-p 0.05."""
    from minlm.evaluate import evaluate_file
    from minlm.generate import Chat, generate
    from minlm.runs import load_run, read_log

    run = run if hasattr(run, "model") else load_run(run)
    meta, mc, tc = run.meta, run.model_config, run.train_config
    log = read_log(run.path)
    last = log.iloc[-1] if len(log) else None
    evals = log.dropna(subset=["val_bpb"]) if len(log) and "val_bpb" in log else log.iloc[0:0]
    parent = meta.get("parent")
    is_chat = bool(parent) and meta.get("kind", "sft") in ("sft", "dpo")

    lines = [f"# {run.name}", ""]
    lines += [f"A {run.model.num_params():,}-parameter `{tc.preset or 'custom'}` model "
              f"({mc.n_layers} layers, dim {mc.dim}, {mc.n_heads} heads, "
              f"{mc.kv_heads} key/value heads, context {mc.block_size}, vocabulary "
              f"{mc.vocab_size}, {mc.mixer}/{mc.position}/{mc.activation}).", ""]
    if parent:
        lines += [f"Fine-tuned from `{Path(parent).name}`; see `train_config.json` for the "
                  "fine-tuning settings and data.", ""]
    lines += ["| | |", "|---|---|"]
    data = meta.get("data_meta", {}).get("source") or tc.data
    rows = [("data", f"`{Path(str(data)).name}`"), ("tokenizer", f"`{Path(meta.get('tokenizer_path', '')).name}` "
                                                   f"(hash {str(meta.get('tokenizer_hash', ''))[:12]})"),
            ("optimizer", f"{tc.optimizer}, lr {tc.lr:g}, {tc.schedule} schedule, batch "
                          f"{tc.batch_size} x {mc.block_size} tokens"),
            ("precision", "bf16 autocast" if meta.get("bf16") else "fp32"),
            ("hardware", meta.get("hardware", meta.get("device", "?")))]
    if meta.get("kind") == "import":  # not trained here: no optimizer, precision or hardware
        rows = rows[:2] + [("imported from", f"`{meta.get('imported_from', '?')}`")]
    if last is not None:
        rows += [("steps", f"{int(last['step']):,}"), ("tokens seen", f"{int(last['tokens']):,}"),
                 ("wall time", f"{float(last['elapsed_s']) / 60:.1f} min")]
    if parent and "val_loss_before" in meta:
        what = "DPO loss" if meta.get("kind") == "dpo" else "loss on assistant tokens"
        ft = meta.get("finetune", {})
        rows += [("fine-tuning", f"{meta.get('kind', '').upper()}, mode {ft.get('mode', '-')}, "
                                 f"{meta.get('epochs', '?')} epochs, lr {ft.get('lr', '?')}"),
                 (f"held-out {what}", f"{meta['val_loss_before']:.4f} before, "
                                      f"**{meta['val_loss_best']:.4f}** after")]
    if len(evals):
        bound = ", an upper bound" if meta.get("bpb_is_bound") else ""
        rows.append((f"val bits per byte{bound} (training log)", f"{float(evals['val_bpb'].iloc[-1]):.4f}"))
    if eval_file is not None:
        res = evaluate_file(run.model, run.tokenizer, eval_file)
        rows += [(f"bits per byte on `{Path(eval_file).name}` (every token)",
                  f"**{res.bits_per_byte:.4f}**"),
                 ("top-1 / top-5 accuracy", f"{res.accuracy[1]:.3f} / {res.accuracy[5]:.3f}")]
    if meta.get("command"):
        rows.append(("trained with", f"`{meta['command']}`"))
    rows.append(("status", meta.get("status", "")))
    lines += [f"| {k} | {v} |" for k, v in rows]
    lines += ["", "## Samples", "", "Temperature 0.7, min-p 0.05, seed "
              f"{seed}; not cherry-picked.", ""]
    if is_chat:
        for message in chat_messages:
            chat = Chat(run.model, run.tokenizer, max_new_tokens=max_new_tokens,
                        temperature=0.7, min_p=0.05, seed=seed)
            lines += [f"> **User:** {message}", ">",
                      f"> **Assistant:** {_quoted(chat.reply(message))}", ""]
    else:
        for prompt in prompts:
            text = generate(run.model, run.tokenizer, prompt, max_new_tokens, temperature=0.7,
                            min_p=0.05, seed=seed)
            lines += [f"> **{prompt}**{_quoted(text)}", ""]
    lines += ["## Use", "", "```", f"python -m minlm generate {run.name} \"Once upon a time\"",
              *( [f"python -m minlm chat {run.name}"] if is_chat else []), "```", ""]
    return "\n".join(lines)


def _quoted(text: str) -> str:
    """Text that stays inside a Markdown quote across its own line breaks."""
    return text.strip("\n").replace("\n", "\n> ")


def write_model_card(run, eval_file: str | os.PathLike | None = None, **kw) -> Path:
    """Write ``README.md`` into the run folder (atomically) and return its path."""
    from minlm.fileio import atomic_write_text
    from minlm.runs import load_run

    run = run if hasattr(run, "model") else load_run(run)
    path = Path(run.path) / "README.md"
    atomic_write_text(path, model_card(run, eval_file, **kw))
    return path
