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
        model, label = load_run(args.run, trust_experiment=args.trust_experiment).model, args.run
        cfg = model.config
    else:
        from minlm.settings import preset_config  # loads experiment= first, as train does

        cfg = preset_config(args.preset, args.overrides)
        model, label = LM(cfg).eval(), args.preset
    idx = torch.randint(0, cfg.vocab_size, (args.batch, args.tokens))
    t = model.trace(idx)
    print(f"{label}: {model.num_params():,} parameters "
          f"({model.num_params(non_embedding=True):,} without embeddings)")
    print(t.format(stats=not args.no_stats, max_depth=args.depth))


def cmd_train(args) -> int:
    from pathlib import Path

    from minlm.config import ConfigError, TrainConfig
    from minlm.runs import read_configs, resolve_run_dir
    from minlm.train import resume_data, train

    from minlm.settings import canonical_item, preset_config, route_items, take_preset

    items = _settings(args)
    if args.recipe:  # a named recipe's settings first; the command line's apply on top
        from minlm.recipes import read_recipe

        preset, recipe_items = read_recipe(args.recipe)
        if args.preset and args.preset != preset:
            raise ConfigError(f"--recipe {args.recipe} trains preset {preset}; drop --preset "
                              f"{args.preset} (or give the model settings as key=value)")
        args.preset, items = preset, [canonical_item(i) for i in recipe_items] + items
    args.preset, items = take_preset(items, args.preset)
    seeds, items = take_seeds(items)
    model_items, train_items = route_items(items)
    train_cfg = TrainConfig(preset=args.preset or "").with_overrides(train_items)
    first = f"{train_cfg.run_name}-s0" if seeds > 1 else train_cfg.run_name  # a group's first
    run_dir = Path(train_cfg.out_dir) / first if train_cfg.run_name else None
    if train_cfg.resume and args.preset is None and run_dir and run_dir.is_dir():
        # resume with what the run saved
        model_cfg, saved_train, meta = read_configs(run_dir, args.trust_experiment)
        data = resume_data(run_dir, saved_train.data, meta)  # found from any working directory
        train_cfg = saved_train.replace(resume=True, overwrite=False, allow_data_change=False,
                                        data=data).with_overrides(train_items)
        model_cfg = model_cfg.with_overrides(model_items)
    else:
        model_cfg = preset_config(args.preset or "llama-1m", model_items)
        train_cfg = train_cfg.replace(preset=args.preset or "llama-1m")
    if train_cfg.init_from and args.preset is None:  # a continuation keeps the parent's model
        model_cfg = read_configs(resolve_run_dir(train_cfg.init_from, train_cfg.out_dir),
                                 args.trust_experiment)[0]
        model_cfg = model_cfg.with_overrides(model_items)
    if seeds > 1 and train_cfg.resume:  # the group's name, not its first member's
        train_cfg = train_cfg.replace(run_name=train_cfg.group or train_cfg.run_name)
    if args.dry_run:  # the resolved settings, before any check of the run folder
        return _dry_run(model=model_cfg, train=train_cfg)
    if seeds > 1:  # sibling runs <run_name>-s0, -s1, ... of one group
        from minlm.train import train_seeds

        results = train_seeds(model_cfg, train_cfg, seeds,
                              trust_experiment=args.trust_experiment)
        group = results[0].run_dir.name.rsplit("-s", 1)[0]
        code = 0
        for result in results:
            code = _report_result(result, train_cfg.verbose,
                                  f"continue the group with: python -m minlm train "
                                  f"run_name={group} out_dir={result.run_dir.parent} "
                                  f"seeds={seeds} resume=true")
        if code == 0:
            print(f"group {group}: {seeds} seeds in {results[0].run_dir.parent}; compare it "
                  f"with: python -m minlm compare {results[0].run_dir.parent / group} ...")
        return code
    result = train(model_cfg, train_cfg, trust_experiment=args.trust_experiment)
    code = _report_result(result, train_cfg.verbose,
                          f"continue it with: python -m minlm train run_name={result.run_dir.name} "
                          f"out_dir={result.run_dir.parent} resume=true")
    if code in (0, 130, 143) and os.environ.get("RANK", "0") == "0":
        _next_commands(result.run_dir)
    return code


def _next_commands(run_dir) -> None:
    """What to try after a run: sample it, and set it beside the shipped llama-1m."""
    from minlm.runs import default_runs_dir

    run = str(run_dir)
    shipped = default_runs_dir() / "llama-1m"
    print("next:")
    print(f'  python -m minlm generate {run} "Once upon a time" --max-new-tokens 100')
    if shipped.is_dir() and shipped.resolve() != run_dir.resolve():
        print(f"  python -m minlm compare {run} {shipped} --x time --out curves.png"
              "   # beside the shipped llama-1m")


def take_seeds(items: list[str]) -> tuple[int, list[str]]:
    """``seeds=N`` among key=value settings: how many seeds of the recipe to train as one
    group (it is no config field: each member is an ordinary run with its own seed)."""
    from minlm.config import ConfigError
    from minlm.seeds import check_seeds
    from minlm.settings import item_key

    named = [i.partition("=")[2] for i in items if item_key(i) == "seeds"]
    rest = [i for i in items if item_key(i) != "seeds"]
    if not named:
        return 1, rest
    try:
        value = int(named[-1])
    except ValueError:
        raise ConfigError(f"seeds={named[-1]!r} is invalid: must be a whole number >= 1 (the "
                          "number of seeds of the recipe to train)") from None
    return check_seeds(value), rest


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
    seeds, overrides = take_seeds(overrides)
    model_cfg, train_cfg, typed = parse_space(overrides, preset or "llama-1m", tpe)
    common = dict(memory_budget=args.memory, eta=args.eta, n_rungs=args.rungs, name=args.name,
                  compute_budget=args.compute, max_params=args.max_params, pruner=args.pruner,
                  sampler=args.sampler, **({"seeds": seeds} if seeds > 1 else {}))
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


def _load_run(args):
    """The command's run, through ``load_run``'s check of the experiment it records."""
    from minlm.runs import load_run

    return load_run(args.run, device=getattr(args, "device", "cpu"),
                    trust_experiment=args.trust_experiment)


def _add_trust_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--trust-experiment", action="store_true",
                   help="import the experiment a run records even when it is a path or not "
                   "found in the local experiment folders (that runs its code: only for runs "
                   "you trust)")


def cmd_ladder(args) -> int:
    import shlex

    import pandas as pd

    from minlm.ladder import ladder, short_rungs

    labels = tuple(x.strip() for x in args.labels.split(","))
    result = ladder(_canonical(args.idea), _canonical(shlex.split(args.baseline)),
                    sizes=args.sizes, tokens_per_param=args.tokens_per_param,
                    max_minutes=args.minutes, labels=labels, name=args.name,
                    out_dir=args.out_dir, storage=args.storage, seeds=args.seeds,
                    train=_canonical(shlex.split(args.train)), evals=args.evals,
                    heartbeat=args.heartbeat)
    shown = ["idea", "size", "seed", "params", "dim", "n_layers", "tokens", "flops", "val_bpb",
             "status"]
    with pd.option_context("display.width", 220, "display.max_columns", 30):
        print(result.table[shown].to_string(index=False))
        print(result.fits.to_string(index=False))
    for row in result.fits.itertuples():
        if row.axis == "compute" and hasattr(row, "heldout_error") and \
                row.heldout_error == row.heldout_error:
            print(f"{row.idea}: the fit on the smaller rungs predicted {row.heldout_predicted:.4f}"
                  f" bpb for the largest, measured {row.heldout_measured:.4f} (error "
                  f"{row.heldout_error:+.4f})")
    for r in short_rungs(result.table).itertuples():
        print(f"{r.idea}-{r.size}: trained {r.tokens:,} of its {r.budget_tokens:,} tokens before "
              f"the time cap (--minutes {args.minutes:g}); it is off the tokens-per-parameter "
              "rule, so the fits mix budgets: raise --minutes or lower --tokens-per-param")
    print(f"wrote {result.dir / 'ladder.csv'}, fits.csv and ladder.png")
    failed = result.table[result.table["status"] != "trained"]
    if len(failed):
        said = "; ".join(f"{r.idea}-{r.size}: {r.status} {r.reason}" for r in failed.itertuples())
        print(f"error: {len(failed)} rung(s) did not train: {said}", file=sys.stderr)
        return 1
    return 0


def _canonical(items: list[str]) -> list[str]:
    from minlm.settings import canonical_item

    return [canonical_item(i) for i in items]


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

    run = _load_run(args)
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
    from minlm.tokenizer import check_text

    run = _load_run(args)
    if run.meta.get("kind") not in ("sft", "dpo"):  # it will talk, but not as a chat model
        print(f"note: {run.name} was not chat-tuned (its record has no sft or dpo), so it "
              "continues the text rather than answers; tune it first: python -m minlm sft "
              f"{run.name} (or pick a chat-tuned run, e.g. llama-1m-chat)", file=sys.stderr)
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

    if (args.data is None) == (args.tasks is None):
        raise ValueError("eval takes --data FILE (loss, bits per byte) or --tasks NAMES "
                         "(lm-evaluation-harness), one of the two")
    if args.tasks is not None:
        from lm_eval.utils import make_table  # lazy: lm_eval is an optional extra

        from minlm.harness import evaluate_tasks

        tasks = [t for t in args.tasks.split(",") if t]
        results = evaluate_tasks(args.run, tasks, limit=args.limit, batch_size=args.batch_size,
                                 device=args.device, num_fewshot=args.num_fewshot,
                                 trust_experiment=args.trust_experiment)
        print(make_table(results))
        return
    run = _load_run(args)
    result = evaluate_file(run.model, run.tokenizer, args.data, max_docs=args.max_docs,
                           batch_size=args.batch_size)
    print(f"{run.name} on {args.data}")
    print(result)


def cmd_card(args) -> None:
    from minlm.modelcard import write_model_card

    path = write_model_card(_load_run(args), args.eval, max_new_tokens=args.max_new_tokens,
                            seed=args.seed)
    print(f"wrote {path}")


def cmd_compare(args) -> None:
    import pandas as pd

    from minlm.evaluate import compare, judge, side_by_side

    table, fig = compare(args.runs, x=args.x)
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.to_string(index=False))
    if table.attrs["note"]:
        print(table.attrs["note"])
    if len(table) > 1 and (table["seeds"] > 1).any():  # groups of seeds: is each gap real?
        verdicts = judge(args.runs)
        print(f"at {verdicts['tokens'][0]:,} tokens (each run's curve interpolated there):")
        for line in verdicts["verdict"]:
            print(f"  {line}")
    fig.savefig(args.out, dpi=120)
    print(f"wrote {args.out}")
    if args.prompts:
        samples = side_by_side(args.runs, args.prompts, args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed,
                               trust_experiment=args.trust_experiment)
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
    result = fn(args.run, config=cfg, trust_experiment=args.trust_experiment)
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

    out = export_run(_load_run(args), args.format, args.out, dtype=args.dtype,
                     overwrite=args.overwrite)
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
    _add_trust_arg(t)
    t.set_defaults(func=cmd_trace)

    tr = sub.add_parser("train", help="train a model and write a run folder",
                        description="Train a model. Any ModelConfig or TrainConfig field can be "
                        "set as key=value, e.g. max_iters=500 lr=1e-3 dim=192.")
    tr.add_argument("--preset", default=None, help="model preset (default llama-1m)")
    tr.add_argument("--recipe", default=None, help="a named recipe of minlm/recipes.json, e.g. "
                    "speedrun (the shipped llama-1m's); key=value settings apply on top")
    tr.add_argument("overrides", nargs="*", help="config overrides as key=value")
    _add_config_args(tr)
    _add_trust_arg(tr)
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

    ld = sub.add_parser("ladder", help="train an idea and a baseline at several sizes and fit "
                        "how each scales", description="Each rung is a run folder under "
                        "OUT_DIR/NAME/ and a trial of one Optuna study (run it again, or from "
                        "several processes sharing --storage, to resume or share the work). "
                        "Width steps in whole heads, depth keeps the base's width per layer; a "
                        "rung trains tokens-per-param x its parameters tokens, capped by "
                        "--minutes. Fits L = E + A*x^-alpha against compute and parameters, "
                        "extrapolates to 10x the largest rung and checks the fit on it.")
    ld.add_argument("idea", nargs="*", help="the idea's settings as key=value (preset=NAME "
                    "among them; default llama-1m)")
    ld.add_argument("--baseline", default="", help="the baseline's settings in one argument, "
                    "e.g. \"preset=llama-1m optimizer=muon\" (default: llama-1m as it is)")
    ld.add_argument("--sizes", default="0.25M,0.5M,1M,2M", help="parameter counts of the rungs")
    ld.add_argument("--tokens-per-param", type=float, default=20.0,
                    help="training tokens per parameter of each rung")
    ld.add_argument("--minutes", type=float, default=0.0,
                    help="wall-clock cap per rung (0: none); the schedule decays by it")
    ld.add_argument("--labels", default="idea,baseline", help="names of the two, comma-separated")
    ld.add_argument("--name", default="ladder", help="folder under --out-dir and study name")
    ld.add_argument("--out-dir", default="trained_models")
    ld.add_argument("--storage", default=None, help="Optuna storage URL shared by several "
                    "processes or machines (default: OUT_DIR/NAME/study.db)")
    ld.add_argument("--seeds", type=_at_least(1), default=1, help="seeds per rung")
    ld.add_argument("--train", default="", help="settings common to every rung, in one "
                    "argument, e.g. \"max_docs=20000 eval_iters=10\"")
    ld.add_argument("--evals", type=_at_least(1), default=4, help="evaluations per rung")
    ld.add_argument("--heartbeat", type=_at_least(1), default=10, help="seconds between a "
                    "trial's heartbeats; a killed rung is retried after three silent ones")
    ld.set_defaults(func=cmd_ladder)

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
    _add_trust_arg(g)
    g.set_defaults(func=cmd_generate)

    c = sub.add_parser("chat", help="talk with a chat-tuned run in the terminal",
                       description="Reads your messages from stdin, one per line; /reset "
                       "clears the history, /quit or end of input stops.")
    c.add_argument("run", help="run name under trained_models/ or a run folder path")
    _add_sampling_args(c, temperature=0.7)
    c.add_argument("--system", default="", help="system message placed before the conversation")
    _add_trust_arg(c)
    c.set_defaults(func=cmd_chat, max_new_tokens=200)

    e = sub.add_parser("eval", help="loss, perplexity, bits per byte and top-k accuracy of a run "
                       "over a whole text file, or lm-evaluation-harness tasks (--tasks)")
    e.add_argument("run", help="run name under trained_models/ or a run folder path")
    e.add_argument("--data", default=None,
                   help="held-out text file (.txt, .jsonl, .json or .parquet)")
    e.add_argument("--tasks", default=None,
                   help="lm-evaluation-harness tasks, comma-separated (minlm's own: "
                   "tinystories_nextword; hub tasks such as hellaswag need internet)")
    e.add_argument("--limit", type=float, default=None,
                   help="--tasks: at most this many documents per task (or a fraction)")
    e.add_argument("--num-fewshot", type=_at_least(0), default=None,
                   help="--tasks: examples placed before each question")
    e.add_argument("--batch-size", type=_at_least(1), default=16, help="windows per forward pass")
    e.add_argument("--max-docs", type=_at_least(0), default=0,
                   help="only the first N documents (0: all)")
    e.add_argument("--device", default="cpu")
    _add_trust_arg(e)
    e.set_defaults(func=cmd_eval)

    cd = sub.add_parser("card", help="write README.md into a run folder: config, training "
                        "figures, bits per byte and three samples")
    cd.add_argument("run", help="run name under trained_models/ or a run folder path")
    cd.add_argument("--eval", default=None, help="held-out text file to measure bits per byte on")
    cd.add_argument("--max-new-tokens", type=int, default=80)
    cd.add_argument("--seed", type=int, default=0)
    _add_trust_arg(cd)
    cd.set_defaults(func=cmd_card)

    cp = sub.add_parser("compare", help="final figures and loss curves of several runs or seed "
                        "groups, and whether each gap between groups exceeds the seed spread")
    cp.add_argument("runs", nargs="+", help="run names, run folder paths or seed groups "
                    "(train seeds=N: the group's name; its seeds become one row and a band)")
    cp.add_argument("--x", default="tokens", choices=["tokens", "flops", "time", "step"],
                    help="x axis of the plot of validation bits per byte (tokens: runs with "
                    "different batch sizes compare on the data they saw)")
    cp.add_argument("--out", default="compare.png", help="where to write the plot (PNG)")
    cp.add_argument("--prompt", dest="prompts", action="append", default=[],
                    help="also print every run's completion of this prompt (repeatable)")
    cp.add_argument("--max-new-tokens", type=int, default=60)
    cp.add_argument("--temperature", type=float, default=0.0, help="for --prompt; 0: greedy")
    cp.add_argument("--seed", type=int, default=0, help="for --prompt")
    _add_trust_arg(cp)
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
        _add_trust_arg(f)
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
    _add_trust_arg(ex)
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
