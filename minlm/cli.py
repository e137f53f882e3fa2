"""``python -m minlm <command>``: a thin layer over the functions the notebooks call too.

Errors from bad input print one line and exit non-zero; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys

from minlm.errors import report_errors  # the one way a command turns errors into exit codes
from minlm.tokenizer import add_tokenizer_commands  # one copy of the tokenizer commands


def cmd_trace(args) -> None:
    import torch

    from minlm.config import ModelConfig
    from minlm.model import LM

    if args.run:  # a run's own model, e.g. one brought in by ``import``
        from minlm.runs import load_run

        if args.overrides:
            raise ValueError(f"--run {args.run} traces the run as saved; drop the overrides "
                             f"{args.overrides}")
        model, label = load_run(args.run).model, args.run
        cfg = model.config
    else:
        cfg = ModelConfig.from_preset(args.preset).with_overrides(args.overrides)
        model, label = LM(cfg).eval(), args.preset
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens))
    t = model.trace(idx)
    print(f"{label}: {model.num_params():,} parameters "
          f"({model.num_params(non_embedding=True):,} without embeddings)")
    print(t.format(stats=not args.no_stats, max_depth=args.depth))


def cmd_train(args) -> int:
    from pathlib import Path

    from minlm.config import ModelConfig, TrainConfig
    from minlm.runs import read_configs, resolve_run_dir
    from minlm.train import resume_data, train

    from minlm.settings import preset_config, route_items, take_preset

    args.preset, items = take_preset(_settings(args), args.preset)
    model_items, train_items = route_items(items)
    train_cfg = TrainConfig(preset=args.preset or "").with_overrides(train_items)
    run_dir = Path(train_cfg.out_dir) / train_cfg.run_name if train_cfg.run_name else None
    if train_cfg.resume and args.preset is None and run_dir and run_dir.is_dir():
        model_cfg, saved_train, meta = read_configs(run_dir)  # resume with what the run saved
        data = resume_data(run_dir, saved_train.data, meta)  # found from any working directory
        train_cfg = saved_train.replace(resume=True, overwrite=False, allow_data_change=False,
                                        data=data).with_overrides(train_items)
        model_cfg = model_cfg.with_overrides(model_items)
    else:
        model_cfg = preset_config(args.preset or "llama-1m", model_items)
        train_cfg = train_cfg.replace(preset=args.preset or "llama-1m")
    if train_cfg.init_from and args.preset is None:  # a continuation keeps the parent's model
        model_cfg = read_configs(resolve_run_dir(train_cfg.init_from, train_cfg.out_dir))[0]
        model_cfg = model_cfg.with_overrides(model_items)
    if args.dry_run:  # the resolved settings, before any check of the run folder
        return _dry_run(model=model_cfg, train=train_cfg)
    result = train(model_cfg, train_cfg)
    return _report_result(result, train_cfg.verbose,
                          f"continue it with: python -m minlm train run_name={result.run_dir.name} "
                          f"out_dir={result.run_dir.parent} resume=true")


def _report_result(result, verbose: bool, resume_hint: str) -> int:
    """Print the result line once (the run already said it when verbose; under torchrun only
    rank 0 speaks) and return the run's exit code (``result.exit_code``, set by the engine:
    0 finished or a planned end, 1 failed, 130 Ctrl-C, 143 SIGTERM); a non-zero end also
    says on stderr where the state is and how to continue."""
    if not verbose and os.environ.get("RANK", "0") == "0":
        print(result)
    code = result.exit_code
    if code == 1:
        print(f"error: the run failed at step {result.step}: {result.stopped} (run folder "
              f"{result.run_dir}; its last good checkpoint is kept)", file=sys.stderr)
    elif code:
        print(f"stopped at step {result.step}: {result.stopped}; the state saved is in "
              f"{result.run_dir}" + (f"; {resume_hint}" if resume_hint else ""), file=sys.stderr)
    return code


def cmd_search(args) -> int:
    import pandas as pd

    from minlm.config import ConfigError, check_folder_name
    from minlm.search import grid, parse_space, search
    from minlm.settings import take_preset

    check_folder_name("--name", args.name)  # before any work; search() checks it too
    tpe = args.sampler == "tpe"
    if args.trials is not None and not tpe:
        raise ConfigError(f"--trials {args.trials} sets how many candidates --sampler tpe draws; "
                          "a grid tries each combination once (add --sampler tpe)")
    preset, overrides = take_preset(list(args.overrides), args.preset)
    model_cfg, train_cfg, typed = parse_space(overrides, preset or "llama-1m", tpe)
    common = dict(memory_budget=args.memory, eta=args.eta, n_rungs=args.rungs, name=args.name,
                  compute_budget=args.compute, max_params=args.max_params, pruner=args.pruner,
                  sampler=args.sampler)
    try:
        if tpe:
            result = search(None, model_cfg, train_cfg, space=typed,
                            n_trials=args.trials or 0, seed=args.seed, **common)
        else:
            result = search(grid(**typed) if typed else [{}], model_cfg, train_cfg, **common)
    except KeyboardInterrupt as e:  # Ctrl-C 130, SIGTERM 143 (SearchInterrupted), as train
        print(e or "search interrupted (Ctrl-C); run the same search again to resume it",
              file=sys.stderr)
        return getattr(e, "exit_code", 130)
    table = result.table
    saved = result.save()
    shown = [c for c in [*typed, "params", "steps", "tokens", "compute_flops", "val_bpb",
                         "status", "reason"] if c in table.columns]
    with pd.option_context("display.width", 220, "display.max_columns", 20,
                           "display.max_colwidth", 70):
        print(table[shown].to_string(index=False))
    best = result.best
    print(f"wrote {saved} and {saved.with_suffix('.png')}")
    if best is None:
        print(f"error: no candidate trained: all {len(table)} were skipped or failed (reasons "
              "in the table above)", file=sys.stderr)
        return 1
    print(f"best: {best.name} ({best.params:,} params, val bpb {best.val_bpb:.4f}) in "
          f"{best.run_dir}")
    return 0


def _sampling(args) -> dict:
    return {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p,
            "min_p": args.min_p, "repetition_penalty": args.repetition_penalty, "seed": args.seed}


_ANSI_BACKGROUNDS = ["\033[48;5;224m", "\033[48;5;194m", "\033[48;5;189m", "\033[48;5;230m"]


def show_tokens(tokenizer, ids: list[int], colour: bool) -> str:
    """Each token of ``ids`` in turn: alternating background colours on a terminal (hover-free
    but easy to tell apart), otherwise in brackets as ``Tokenizer.display`` prints them."""
    shown = tokenizer.display(ids)
    if not colour:
        return str(shown)
    out = [f"\033[30m{_ANSI_BACKGROUNDS[k % len(_ANSI_BACKGROUNDS)]}{p}" for k, p in
           enumerate(shown.pieces)]
    return "".join(out).replace("\n", "\\n\033[0m\n") + "\033[0m"


def cmd_generate(args) -> None:
    from minlm.generate import complete, stream
    from minlm.runs import load_run

    run = load_run(args.run, device=args.device)
    sampling = _sampling(args)
    if len(args.prompts) == 1 and not args.show_tokens:  # one prompt: stream it as it comes
        pieces = stream(run.model, run.tokenizer, args.prompts[0], args.max_new_tokens,
                        stop=args.stop, use_cache=not args.no_cache, **sampling)
        print(args.prompts[0], end="", flush=True)  # after the arguments were checked
        for piece in pieces:
            print(piece, end="", flush=True)
        print()
        return
    results = complete(run.model, run.tokenizer, args.prompts, args.max_new_tokens,
                       stop=args.stop, use_cache=not args.no_cache, **sampling)
    colour = sys.stdout.isatty() and not args.brackets
    for i, c in enumerate(results):
        if args.show_tokens:
            print(show_tokens(run.tokenizer, c.prompt_ids[1:] + c.ids, colour))
        else:
            print(c.prompt + c.text)
        if i < len(results) - 1:
            print("-" * 40)


def cmd_chat(args) -> None:
    from minlm.generate import Chat
    from minlm.runs import load_run
    from minlm.tokenizer import check_text

    run = load_run(args.run, device=args.device)
    chat = Chat(run.model, run.tokenizer, system=args.system,
                max_new_tokens=args.max_new_tokens, **_sampling(args))
    interactive = sys.stdin.isatty()
    if interactive:
        print(f"chatting with {run.name}; /reset clears the history, /quit (or Ctrl-D) ends")
    while True:
        if interactive:
            print("you> ", end="", flush=True)
        line = _read_line()
        if not line:  # end of input
            break
        message = line.strip()
        try:
            check_text(message, "that message")
        except ValueError as e:  # reject this line, keep the session
            print(f"error: {e}; not sent", file=sys.stderr)
            continue
        if message == "/quit":
            break
        if message == "/reset":
            chat.history.clear()
            continue
        if not message:
            continue
        try:
            print("assistant> ", end="", flush=True)
            for piece in chat.stream_reply(message):
                print(piece, end="", flush=True)
            print()
        except ValueError as e:  # e.g. a message too long for the context: say so, go on
            print(f"\nerror: {e}", file=sys.stderr)


def _read_line() -> str:
    """One line of stdin; bytes that are not UTF-8 become lone surrogates (for check_text to
    refuse) instead of ending the session with a UnicodeDecodeError."""
    raw = getattr(sys.stdin, "buffer", None)
    if raw is None:  # a text stream (tests, notebooks)
        return sys.stdin.readline()
    return raw.readline().decode("utf-8", errors="surrogateescape")


def cmd_eval(args) -> None:
    from minlm.evaluate import evaluate_file
    from minlm.runs import load_run

    run = load_run(args.run, device=args.device)
    result = evaluate_file(run.model, run.tokenizer, args.data, max_docs=args.max_docs,
                           batch_size=args.batch_size)
    print(f"{run.name} on {args.data}")
    print(result)


def cmd_card(args) -> None:
    from minlm.modelcard import write_model_card

    path = write_model_card(args.run, args.eval, max_new_tokens=args.max_new_tokens, seed=args.seed)
    print(f"wrote {path}")


def cmd_compare(args) -> None:
    import pandas as pd

    from minlm.evaluate import compare, side_by_side

    table, fig = compare(args.runs, x=args.x)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    if args.prompts:
        samples = side_by_side(args.runs, args.prompts, args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed)
        for prompt, row in samples.iterrows():
            print(f"\n=== {prompt}")
            for run_name, text in row.items():
                print(f"--- {run_name}: {prompt}{text}")


def cmd_convert(args) -> None:
    from minlm.chatdata import convert

    data = convert(args.src, args.dest, column=args.column, skip_invalid=args.skip_invalid)
    skipped = f" ({data.skipped} malformed skipped)" if data.skipped else ""
    print(f"wrote {len(data)} conversations to {args.dest}{skipped}")


def _finetune(args, kind: str) -> int:
    from minlm import finetune

    cls, fn = (finetune.SFTConfig, finetune.sft) if kind == "sft" else (finetune.DPOConfig,
                                                                          finetune.dpo)
    cfg = cls().with_overrides(_settings(args))
    if args.data:
        cfg = cfg.replace(data=args.data)
    if args.dry_run:
        return _dry_run(**{kind: cfg})
    if args.skip_invalid:
        cfg = cfg.replace(skip_invalid=True)
    result = fn(args.run, config=cfg)
    data = f" --data {cfg.data}" if cfg.data else ""
    return _report_result(result, cfg.verbose,
                          f"continue it with: python -m minlm {kind} {args.run}{data} "
                          f"run_name={result.run_dir.name} out_dir={result.run_dir.parent} "
                          "resume=true")


def cmd_sft(args) -> int:
    return _finetune(args, "sft")


def cmd_dpo(args) -> int:
    return _finetune(args, "dpo")


def cmd_export(args) -> None:
    from minlm.export import export_run

    out = export_run(args.run, args.format, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"wrote {out}")


def cmd_import(args) -> None:
    from minlm.hub_import import import_checkpoint

    run_dir = import_checkpoint(args.source, args.name, overwrite=args.overwrite)
    print(f"wrote run {run_dir}; try: python -m minlm generate {run_dir} \"Once upon a time\"")


def _add_sampling_args(p: argparse.ArgumentParser, temperature: float = 0.8) -> None:
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--temperature", type=float, default=temperature, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling threshold")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min_p * max prob")
    p.add_argument("--repetition-penalty", type=float, default=1.0,
                   help="CTRL-style penalty on tokens already present (1: none)")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--device", default="cpu")


def _count(text: str) -> int:
    """``50000``, ``50K``, ``20M`` or ``1G`` as an int (argparse type for token counts)."""
    scale = {"K": 10**3, "M": 10**6, "G": 10**9}.get(text[-1:].upper(), 1)
    try:
        value = float(text[:-1] if scale > 1 else text) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a count such as 50000, 50K, 20M or "
                                         "1G") from None
    if value < 0 or value != int(value):
        raise argparse.ArgumentTypeError(f"{text!r} must be a whole number >= 0")
    return int(value)


def cmd_prepare(args) -> None:
    from minlm.prepare import prepare

    shards = prepare(args.source, args.tokenizer, val_fraction=args.val_fraction,
                     num_workers=args.workers, max_docs=0, out_dir=args.out,
                     max_tokens=args.max_tokens, shard_tokens=args.shard_tokens,
                     text_column=args.text_column, split_by=args.split_by,
                     loss_mask=args.loss_mask, hf_config=args.config, hf_split=args.split,
                     full=args.full)
    m = shards.meta
    print(f"prepared {shards.dir}")
    for split in ("train", "val"):
        print(f"  {split}: {m['tokens'][split]:,} tokens, {m['documents'][split]:,} documents, "
              f"{m['bytes'][split]:,} bytes of text, {len(m.get('files', {}).get(split, [1]))} "
              "file(s)")
    print(f"train on it with: python -m minlm train data={shards.dir} tokenizer={args.tokenizer} "
          f"vocab_size={m['vocab_size']}")


def add_prepare_parser(sub) -> None:
    from minlm.chatdata import MODES
    from minlm.sources import SPLIT_BY

    p = sub.add_parser("prepare", help="tokenize a corpus into the shard folder training reads",
                       description="Read a text file, a folder, JSON/JSONL/parquet (a text "
                       "column or chat messages) or a Hugging Face dataset (hf:<id>, streamed) "
                       "and write token shards; train with data=<the folder it prints>.")
    p.add_argument("source", help="tinystories, shakespeare, a file, a folder, or hf:<dataset id>")
    p.add_argument("--tokenizer", required=True,
                   help="tokenizer name (e.g. tinystories-4096) or path to a tokenizer file")
    p.add_argument("--out", default=None, help="output folder (default: a cache folder keyed "
                   "by source, tokenizer and options; $MINLM_CACHE_DIR)")
    p.add_argument("--max-tokens", type=_count, default=0,
                   help="stop after the document that reaches this many tokens (50M, 1G; 0: all)")
    p.add_argument("--shard-tokens", type=_count, default=0,
                   help="cut train into numbered shard files of this many tokens (0: one file)")
    p.add_argument("--val-fraction", type=float, default=0.0,
                   help="held-out share of documents when the source has no val file (0: 0.05)")
    p.add_argument("--text-column", default="text", help="field/column holding the text")
    p.add_argument("--split-by", choices=SPLIT_BY, default="auto",
                   help="how a text file splits into documents (auto: <|endoftext|> lines, "
                   "else blank lines)")
    p.add_argument("--loss-mask", choices=MODES, default=None,
                   help="for chat data: store which tokens are targets (pretraining then "
                   "trains only those)")
    p.add_argument("--config", default=None, help="Hugging Face dataset config (hf: sources)")
    p.add_argument("--split", default="train", help="Hugging Face dataset split (hf: sources)")
    p.add_argument("--full", action="store_true",
                   help="download a named corpus whole (default: its first 100 MB)")
    p.add_argument("--workers", type=int, default=0, help="tokenizing processes (0: all cores)")
    p.set_defaults(func=cmd_prepare)
def _at_least(least: int):
    """An argparse type: an integer >= ``least``, refused with the option's usage otherwise."""
    def parse(raw: str) -> int:
        try:
            value = int(raw)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{raw!r} is not an integer") from None
        if value < least:
            raise argparse.ArgumentTypeError(f"{value} is invalid: must be >= {least}")
        return value
    return parse


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="minlm", description=__doc__.splitlines()[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("trace", help="print the shape trace of a preset model")
    t.add_argument("--preset", default="llama-1m", help="model preset name")
    t.add_argument("--run", default=None, help="trace this run's model instead of a preset")
    t.add_argument("--batch", type=int, default=1, help="batch size of the dummy input")
    t.add_argument("--tokens", type=int, default=16, help="sequence length of the dummy input")
    t.add_argument("--depth", type=int, default=None, help="deepest level of the tree shown")
    t.add_argument("--no-stats", action="store_true", help="hide min/mean/max of outputs")
    t.add_argument("overrides", nargs="*", help="ModelConfig overrides as key=value")
    t.set_defaults(func=cmd_trace)

    tr = sub.add_parser("train", help="train a model and write a run folder",
                        description="Train a model. Any ModelConfig or TrainConfig field can be "
                        "set as key=value, e.g. max_iters=500 lr=1e-3 dim=192.")
    tr.add_argument("--preset", default=None, help="model preset (default llama-1m)")
    tr.add_argument("overrides", nargs="*", help="config overrides as key=value")
    _add_config_args(tr)
    tr.set_defaults(func=cmd_train)

    se = sub.add_parser("search", help="grid or TPE search over config fields, with a memory "
                        "budget and successive halving or Hyperband", description="Grid search: "
                        "key=a,b,c makes an axis, key=a a fixed setting; any ModelConfig or "
                        "TrainConfig field. With --sampler tpe, Optuna's TPE draws --trials "
                        "candidates: key=a,b,c is a choice, key=lo:hi or key=lo:hi:log a range. "
                        "Every trial is a run under out_dir/NAME/; the table (best first) is "
                        "printed and saved with a plot.")
    se.add_argument("--preset", default=None, help="base model preset (default llama-1m)")
    se.add_argument("--name", default="search", help="folder under out_dir for the trials")
    se.add_argument("--memory", default=None, help="peak memory budget per trial, e.g. 4GB")
    se.add_argument("--compute", type=float, default=None,
                    help="training FLOPs per trial: bigger models get fewer steps (equal compute)")
    se.add_argument("--max-params", type=int, default=None, help="skip larger candidates")
    se.add_argument("--eta", type=int, default=3, help="keep the best 1/eta at each rung")
    se.add_argument("--rungs", type=int, default=3, help="number of rungs (1: no cutting)")
    se.add_argument("--sampler", default="grid", help="grid (every combination, in order) or "
                    "tpe (Optuna's TPE draws --trials candidates)")
    se.add_argument("--trials", type=_at_least(1), default=None,
                    help="how many candidates --sampler tpe draws")
    se.add_argument("--pruner", default="halving", help="halving (successive halving) or "
                    "hyperband, at the same rungs")
    se.add_argument("--seed", type=int, default=None, help="seed of the TPE sampler")
    se.add_argument("overrides", nargs="*", help="key=value or key=a,b,c (an axis)")
    se.set_defaults(func=cmd_search)

    g = sub.add_parser("generate", help="continue prompts with a trained run")
    g.add_argument("run", help="run name under trained_models/ or a run folder path")
    g.add_argument("prompts", nargs="+", help="one or more prompts (several run as one batch)")
    _add_sampling_args(g)
    g.add_argument("--stop", action="append", default=None,
                   help="stop a continuation at this text (repeatable)")
    g.add_argument("--show-tokens", action="store_true",
                   help="show each token: colours on a terminal, else brackets")
    g.add_argument("--brackets", action="store_true", help="with --show-tokens: never colour")
    g.add_argument("--no-cache", action="store_true",
                   help="recompute the whole context every step (slow; for checking)")
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk with a chat-tuned run in the terminal",
                       description="Reads your messages from stdin, one per line; /reset "
                       "clears the history, /quit or end of input stops.")
    c.add_argument("run", help="run name under trained_models/ or a run folder path")
    _add_sampling_args(c, temperature=0.7)
    c.add_argument("--system", default="", help="system message placed before the conversation")
    c.set_defaults(func=cmd_chat, max_new_tokens=200)

    e = sub.add_parser("eval", help="loss, perplexity, bits per byte and top-k accuracy of a run "
                       "over a whole text file")
    e.add_argument("run", help="run name under trained_models/ or a run folder path")
    e.add_argument("--data", required=True,
                   help="held-out text file (.txt, .jsonl, .json or .parquet)")
    e.add_argument("--batch-size", type=_at_least(1), default=16, help="windows per forward pass")
    e.add_argument("--max-docs", type=_at_least(0), default=0,
                   help="only the first N documents (0: all)")
    e.add_argument("--device", default="cpu")
    e.set_defaults(func=cmd_eval)

    cd = sub.add_parser("card", help="write README.md into a run folder: config, training "
                        "figures, bits per byte and three samples")
    cd.add_argument("run", help="run name under trained_models/ or a run folder path")
    cd.add_argument("--eval", default=None, help="held-out text file to measure bits per byte on")
    cd.add_argument("--max-new-tokens", type=int, default=80)
    cd.add_argument("--seed", type=int, default=0)
    cd.set_defaults(func=cmd_card)

    cp = sub.add_parser("compare", help="final figures and loss curves of several runs")
    cp.add_argument("runs", nargs="+", help="run names or run folder paths")
    cp.add_argument("--x", default="step", choices=["step", "tokens", "time"],
                    help="x axis of the plot of validation bits per byte")
    cp.add_argument("--out", default="compare.png", help="where to write the plot (PNG)")
    cp.add_argument("--prompt", dest="prompts", action="append", default=[],
                    help="also print every run's completion of this prompt (repeatable)")
    cp.add_argument("--max-new-tokens", type=int, default=60)
    cp.add_argument("--temperature", type=float, default=0.0, help="for --prompt; 0: greedy")
    cp.add_argument("--seed", type=int, default=0, help="for --prompt")
    cp.set_defaults(func=cmd_compare)

    cv = sub.add_parser("convert", help="convert chat data between .jsonl, .json and .parquet",
                        description="Read conversations (lists of {role, content} messages) "
                        "and write them as {\"messages\": [...]} examples; formats follow the "
                        "suffixes.")
    cv.add_argument("src", help="input .jsonl, .json or .parquet file")
    cv.add_argument("dest", help="output .jsonl, .json or .parquet file")
    cv.add_argument("--column", default="messages",
                    help="field (JSON) or column (parquet) holding the messages")
    cv.add_argument("--skip-invalid", action="store_true",
                    help="skip malformed examples (and report how many) instead of failing")
    cv.set_defaults(func=cmd_convert)
    add_prepare_parser(sub)

    common = ("epochs, max_steps, batch_size, lr, warmup_iters, val_fraction, eval_interval, "
              "patience, max_examples, skip_invalid, lora_rank, lora_alpha, lora_targets, "
              "run_name, out_dir, overwrite, device")
    for kind, what, own, default in (
            ("sft", "supervised fine-tuning on conversations", "mode, pack, cut",
             "hh_rlhf_helpful_sft"),
            ("dpo", "direct preference optimisation on chosen/rejected pairs", "beta",
             "hh_rlhf_helpful_dpo")):
        f = sub.add_parser(kind, help=f"{what}; writes a new run beside the parent",
                           description=f"{what.capitalize()} of a run, saved as a new run that "
                           f"records its parent. Settings as key=value: {own}, {common} (an "
                           "unknown key lists them all).")
        f.add_argument("run", help="parent run name under trained_models/ or a run folder path")
        f.add_argument("--data", default=None,
                       help=f"chat data: a .jsonl/.json/.parquet file or a name under "
                       f"$MINLM_DATA_DIR (default {default})")
        f.add_argument("--skip-invalid", action="store_true",
                       help="skip malformed examples (and report how many); same as "
                       "skip_invalid=true")
        f.add_argument("overrides", nargs="*", help="settings as key=value, e.g. epochs=2 "
                       "lora_rank=8")
        _add_config_args(f)
        f.set_defaults(func=cmd_sft if kind == "sft" else cmd_dpo)
    _add_travel_commands(sub)
    tk = sub.add_parser("tokenizer", help="train a sentencepiece tokenizer, or measure bytes per "
                        "token of tokenizers on a text file")
    add_tokenizer_commands(tk.add_subparsers(dest="tokenizer_command", required=True))
    return p


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", default=None, help="a JSON or YAML file of settings; key=value "
                   "overrides apply on top (the seed projects' names are accepted too)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the resolved settings as JSON and stop")


def _settings(args) -> list[str]:
    """The --config file's settings, then the command line's, keys in our spelling."""
    from minlm.settings import canonical_item, read_config_file

    items = (read_config_file(args.config) if getattr(args, "config", None) else [])
    return [canonical_item(i) for i in items + list(args.overrides)]


def _dry_run(**configs) -> int:
    import json

    print(json.dumps({k: v.to_dict() for k, v in configs.items()}, indent=2))
    return 0


def _add_travel_commands(sub) -> None:
    ex = sub.add_parser("export", help="write a run as a transformers folder or a GGUF file",
                        description="--format hf: a folder AutoModelForCausalLM/AutoTokenizer "
                        "load without minlm (llama- and gpt2-family runs); --format gguf: one "
                        "file for llama.cpp (llama family).")
    ex.add_argument("run", help="run name under trained_models/ or a run folder path")
    ex.add_argument("--format", default="hf", choices=["hf", "gguf"])
    ex.add_argument("--out", required=True, help="folder (hf) or .gguf file to write")
    ex.add_argument("--dtype", default="f16", choices=["f32", "f16", "q8_0"],
                    help="GGUF weight type (norms stay f32)")
    ex.add_argument("--overwrite", action="store_true", help="replace --out if it exists")
    ex.set_defaults(func=cmd_export)

    im = sub.add_parser("import", help="a Hugging Face Llama or GPT-2 checkpoint as a run folder")
    im.add_argument("source", help="checkpoint folder (config.json + safetensors + tokenizer), "
                    "or hf:owner/name to download it from the Hub")
    im.add_argument("--name", default=None, help="run name (default: the folder's name)")
    im.add_argument("--overwrite", action="store_true", help="replace a run of that name")
    im.set_defaults(func=cmd_import)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # key=value after an option (``sft RUN --data F epochs=2``) are overrides too
        if not hasattr(args, "overrides") or any("=" not in e or e.startswith("-") for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = list(args.overrides) + extra
    return report_errors(lambda: args.func(args), args.debug)
