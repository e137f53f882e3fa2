"""Post-training: supervised fine-tuning on chat data (SFT) and DPO, optionally with LoRA.

    result = sft("trained_models/llama-1m", data="hh_rlhf_helpful_sft", epochs=1)
    result = dpo(result.run_dir, data="hh_rlhf_helpful_dpo", lora_rank=8)

    python -m minlm sft <run> --data ../shared/data/chat/hh_rlhf_helpful_sft.jsonl epochs=2
    python -m minlm dpo <run> --data ../shared/data/chat/hh_rlhf_helpful_dpo.jsonl beta=0.1

Each call leaves a new run folder beside its parent (same layout as a pretraining run: both
configs, merged weights that ``load_run`` reads, ``log.csv``, a tokenizer copy, checkpoints)
whose ``train_config.json`` meta records the parent run by name, the fine-tuning config and
the data. The conversations are rendered with the template of ``minlm.chatdata``, which
``generate.Chat`` speaks, so the result chats through ``python -m minlm chat <run>``.

This module only sets a fine-tune up: the loop is the one training engine (``minlm.engine``)
running the ``SFT`` or ``DPO`` objective of ``minlm.objectives``, so fine-tuning checkpoints,
resumes exactly (``resume=true``), checks free space, handles Ctrl-C / SIGTERM and non-finite
losses exactly as pretraining does. SFT trains on the tokens a mode selects (``response``:
assistant turns), evaluating the same loss on held-out conversations and stopping early when
it rises; the best weights are kept. LoRA lives in ``minlm.lora``; a LoRA fine-tune of a run
that exports to transformers also keeps its adapter in PEFT's format in ``<run>/adapter/``
(``minlm.adapters``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from minlm import runs
from minlm.adapters import ADAPTER_DIR
from minlm.chatdata import (
    Mode,
    chat_examples,
    read_conversations,
    read_preferences,
    resolve_chat_file,
)
from minlm.config import (
    ConfigError,
    Device,
    Precision,
    _fail,
    _Serialisable,
    check_folder_name,
    logger_names,
)
from minlm.engine import Engine, StopFlag
from minlm.interop import exportable
from minlm.lora import (  # noqa: F401 - re-exported: the public fine-tuning API
    LoRALinear,
    add_lora,
    count_trainable,
    lora_disabled,
    merge_lora,
)
from minlm.objectives import (  # noqa: F401 - re-exported: the public fine-tuning API
    DPO,
    SFT,
    collate,
    dpo_loss,
    masked_loss,
    preference_examples,
    sequence_logps,
    sft_loss,
    split_items,
)
from minlm.optim import make_optimizer
from minlm.runfolder import RunFolder
from minlm.train import resolve_device, saved_note, use_bf16

# ---------------------------------------------------------------------------------------
# configs
# ---------------------------------------------------------------------------------------


@dataclass
class _TuneConfig(_Serialisable):
    """Settings shared by SFT and DPO."""

    data: str = ""  # a .jsonl/.json/.parquet file, a path under $MINLM_DATA_DIR, or a name
    run_name: str = ""  # empty: <parent>-sft / <parent>-dpo
    out_dir: str = ""  # empty: beside the parent run
    epochs: int = 1
    max_steps: int = 0  # stop after this many steps even if epochs remain (0: epochs decide)
    batch_size: int = 8
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup_iters: int = 10
    weight_decay: float = 0.0
    grad_clip: float = 1.0  # 0 disables clipping
    val_fraction: float = 0.05  # held-out share of the examples; 0: no validation
    max_val: int = 200  # at most this many held-out examples (the rest train)
    eval_interval: int = 50  # steps between evaluations (also at each epoch's end); 0: epochs only
    patience: int = 2  # stop after this many evaluations in a row above the best; 0: never
    max_examples: int = 0  # read only the first N examples (0: all)
    skip_invalid: bool = False  # skip malformed examples (and count them) instead of failing
    lora_rank: int = 0  # 0: fine-tune every weight; R > 0: train rank-R adapters only
    lora_alpha: float = 16.0  # adapters are scaled by alpha / rank
    lora_targets: str = "q_proj,k_proj,v_proj,o_proj"  # linear layers in the blocks, or "all"
    lora_dropout: float = 0.0
    seed: int = 1337
    device: Device = "auto"
    precision: Precision = "fp32"
    log_interval: int = 10
    overwrite: bool = False
    verbose: bool = True
    resume: bool = False  # continue this fine-tune from its newest checkpoint
    checkpoint_interval: int = 50  # steps between checkpoints (also at the end)
    keep_checkpoints: int = 2
    max_bad_steps: int = 5  # stop as failed after this many non-finite steps in a row
    logger: str = ""  # also log rows to "tensorboard", "mlflow", "wandb" (see minlm.loggers)

    def __post_init__(self) -> None:
        self._check_types()  # also rejects NaN / infinity in float fields
        check_folder_name("run_name", self.run_name)
        self._require(("epochs", "batch_size", "log_interval", "checkpoint_interval",
                       "keep_checkpoints", "max_bad_steps"), lambda v: v >= 1,
                      "must be a positive integer")
        logger_names(self.logger)
        if self.resume and self.overwrite:
            raise ConfigError("resume=True and overwrite=True contradict each other; pick one")
        self._require(("max_steps", "warmup_iters", "max_val", "eval_interval", "patience",
                       "max_examples", "lora_rank", "weight_decay", "grad_clip"),
                      lambda v: v >= 0, "must be >= 0")
        self._require(("lr",), lambda v: v > 0, "must be > 0")
        self._require(("min_lr_ratio",), lambda v: 0 <= v <= 1, "must be in [0, 1]")
        if not 0 <= self.val_fraction < 1:
            _fail("val_fraction", self.val_fraction, "must be in [0, 1)")
        if self.lora_rank and not self.lora_alpha > 0:
            _fail("lora_alpha", self.lora_alpha, "must be > 0")
        if not 0 <= self.lora_dropout < 1:
            _fail("lora_dropout", self.lora_dropout, "must be in [0, 1)")
        if not [t for t in self.lora_targets.split(",") if t.strip()]:
            _fail("lora_targets", self.lora_targets, "must name linear layers, e.g. "
                  "'q_proj,v_proj', or be 'all'")


@dataclass
class SFTConfig(_TuneConfig):
    """Supervised fine-tuning on conversations."""

    data: str = "hh_rlhf_helpful_sft"
    mode: Mode = "response"  # which tokens are trained: see minlm.chatdata
    pack: bool = True  # concatenate short examples into full rows (fewer padded tokens)
    cut: float = 0.5  # mode="completion": share of each turn given as its first part

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.cut < 1:
            _fail("cut", self.cut, "must be in [0, 1)")


@dataclass
class DPOConfig(_TuneConfig):
    """Direct preference optimisation on (prompt, chosen, rejected) triples."""

    data: str = "hh_rlhf_helpful_dpo"
    lr: float = 1e-4
    beta: float = 0.1  # strength of the pull towards the reference (higher: stay closer)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not self.beta > 0:
            _fail("beta", self.beta, "must be > 0")




@dataclass
class FinetuneResult:
    run_dir: Path
    kind: str  # "sft" or "dpo"
    step: int
    epochs: float  # epochs completed (a fraction when stopped inside one)
    val_loss_before: float | None
    val_loss: float | None  # of the weights kept (the best evaluation)
    best_step: int
    stopped: str  # "" when every epoch (or max_steps) ran, else why it stopped early
    metrics: dict = field(default_factory=dict)  # the kept evaluation's other figures
    status: str = "finished"  # as train_config.json records it
    exit_code: int = 0  # what the command exits with: 0, 1 (failed), 130 (Ctrl-C), 143 (SIGTERM)

    def __str__(self) -> str:
        figures = ""
        if self.val_loss is not None:
            figures = (f"; val loss {self.val_loss_before:.4f} -> {self.val_loss:.4f} "
                       f"(best at step {self.best_step})")
        extra = "".join(f", {k} {v:.3f}" for k, v in self.metrics.items())
        why = f" ({self.stopped})" if self.stopped else ""
        failed = "FAILED: " if self.status.startswith("failed") else ""
        return (f"{failed}{self.kind} run {self.run_dir}: {self.step} steps, {self.epochs:.2f} "
                f"epochs{why}{figures}{extra}{saved_note(self)}")


# fine-tuning settings a resumed run may change: they do not decide what is trained on
RESUME_FREE = ("resume", "overwrite", "verbose", "device", "log_interval", "checkpoint_interval",
               "keep_checkpoints", "max_bad_steps", "patience")


def _load_sft(cfg: SFTConfig, path: Path, tokenizer, max_len: int, say):
    data = read_conversations(path, skip_invalid=cfg.skip_invalid, limit=cfg.max_examples)
    train_convs, val_convs = split_items(data.examples, cfg.val_fraction, cfg.max_val)
    train_items, stats = chat_examples(tokenizer, train_convs, cfg.mode, max_len, cfg.cut,
                                       cfg.skip_invalid)
    val_items, val_stats = chat_examples(tokenizer, val_convs, cfg.mode, max_len, cfg.cut,
                                         cfg.skip_invalid)
    meta = {"conversations": len(data), "skipped_malformed": data.skipped,
            "train_examples": stats.examples, "val_examples": val_stats.examples,
            "truncated": stats.truncated + val_stats.truncated,
            "dropped_empty": stats.dropped + val_stats.dropped,
            "invalid": stats.invalid + val_stats.invalid, "mode": cfg.mode}
    if data.skipped:
        say(f"skipped {data.skipped} malformed examples of {path}; first: {data.problems[0]}")
    return train_items, val_items, meta


def _load_dpo(cfg: DPOConfig, path: Path, tokenizer, max_len: int, say):
    data = read_preferences(path, skip_invalid=cfg.skip_invalid, limit=cfg.max_examples)
    pairs = [preference_examples(tokenizer, p, max_len) for p in data.examples]
    train_items, val_items = split_items(pairs, cfg.val_fraction, cfg.max_val)
    meta = {"pairs": len(data), "skipped_malformed": data.skipped,
            "train_pairs": len(train_items), "val_pairs": len(val_items)}
    if data.skipped:
        say(f"skipped {data.skipped} malformed pairs of {path}; first: {data.problems[0]}")
    return train_items, val_items, meta


def _record_train_config(parent_cfg, cfg: _TuneConfig, run_dir: Path, data_path: Path,
                         planned: int):
    """The engine's settings for this fine-tune, as train_config.json holds them (so the folder
    reads like any run; the full fine-tuning config is in meta.finetune)."""
    return parent_cfg.replace(
        run_name=run_dir.name, out_dir=str(run_dir.parent), data=cfg.data, tokenizer="",
        max_iters=max(1, planned), max_minutes=0.0, epochs=0.0, batch_size=cfg.batch_size,
        grad_accum_steps=1, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio,
        warmup_iters=cfg.warmup_iters, schedule="cosine", optimizer="adamw",
        weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
        eval_interval=cfg.eval_interval or max(1, planned), log_interval=cfg.log_interval,
        checkpoint_interval=cfg.checkpoint_interval, keep_checkpoints=cfg.keep_checkpoints,
        max_bad_steps=cfg.max_bad_steps, patience=cfg.patience, logger=cfg.logger,
        keep_best=False, init_from="",
        seed=cfg.seed, device=cfg.device, precision=cfg.precision, compile=False, fsdp=False,
        resume=cfg.resume, overwrite=cfg.overwrite, max_docs=cfg.max_examples,
        val_fraction=cfg.val_fraction, verbose=cfg.verbose)


def _check_resume(run_dir: Path, cfg: _TuneConfig) -> None:
    saved = runs.read_record(run_dir)[2].get("finetune", {})
    given = runs.portable(cfg.to_dict())  # as the saved record has it
    diffs = [f"{k}: saved {saved[k]!r}, given {v!r}" for k, v in given.items()
             if k not in RESUME_FREE and k in saved and saved[k] != v]
    if diffs:
        raise runs.RunError(f"cannot resume {run_dir.name!r}: the fine-tuning config differs "
                            "from the saved run (" + "; ".join(diffs) + ")")


def finetune(kind: str, run, cfg: _TuneConfig, stop: StopFlag | None = None,
             callbacks: Iterable[Callable[[dict], None]] = (),
             trust_experiment: bool = False) -> FinetuneResult:
    """Load the parent run, add adapters if asked, and run the ``kind`` objective ("sft" or
    "dpo") through the engine into a new run folder; returns its figures.
    ``trust_experiment``: as ``load_run``'s, for the parent."""
    say = tqdm.write if cfg.verbose else (lambda *a, **k: None)
    device = resolve_device(cfg.device)
    parent = runs.load_run(run, device=device, trust_experiment=trust_experiment)
    tokenizer, model, model_cfg = parent.tokenizer, parent.model, parent.model_config
    tokenizer.chat_tokens  # noqa: B018 - a tokenizer without chat tokens fails here
    max_len = model_cfg.block_size + 1
    bf16 = use_bf16(cfg.precision, device)
    data_path = resolve_chat_file(cfg.data)
    out = Path(cfg.out_dir) if cfg.out_dir else parent.path.parent
    run_dir = out / (cfg.run_name or f"{parent.name}-{kind}")
    if run_dir.resolve() == parent.path.resolve():
        raise runs.RunError(f"run_name={run_dir.name!r} is the parent run itself; choose "
                            "another run_name")
    # the checks that only read come before the data is read and anything is written
    if RunFolder.check(run_dir.parent, run_dir.name, cfg.resume, cfg.overwrite) and cfg.resume:
        _check_resume(run_dir, cfg)
    load = _load_sft if kind == "sft" else _load_dpo
    train_items, val_items, data_meta = load(cfg, data_path, tokenizer, max_len, say)
    if not train_items:
        empty = data_meta.get("dropped_empty", 0) >= data_meta.get("conversations", 1)
        raise ValueError(f"no training examples left in {data_path} ({data_meta}); "
                         + ("no conversation has a turn to learn from (in mode='response': "
                            "an assistant reply); check the roles" if empty else
                            "use more data or a lower val_fraction"))
    folder = RunFolder(run_dir.parent, run_dir.name, cfg.resume, cfg.overwrite, say)
    try:
        torch.manual_seed(cfg.seed)
        params = model.num_params()
        lora_layers = (add_lora(model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                                cfg.lora_dropout) if cfg.lora_rank else [])
        common = (model, train_items, val_items, cfg.epochs, cfg.batch_size, cfg.seed,
                  tokenizer.pad_id, device)
        objective = (SFT(*common, max_len, cfg.pack) if kind == "sft"
                     else DPO(*common, cfg.beta, bool(lora_layers)))
        if lora_layers and exportable(model_cfg):  # peft's adapter needs the transformers names
            objective.adapter_base = parent.name
        trainable = count_trainable(model)
        planned = sum(objective.steps_per_epoch())
        planned = min(planned, cfg.max_steps) if cfg.max_steps else planned
        train_cfg = _record_train_config(parent.train_config, cfg, folder.final, data_path,
                                         planned)
        optimizer = make_optimizer(model, train_cfg, device)
        meta = {"kind": kind, "parent": parent.name, "finetune": cfg.to_dict(),
                "params": params, "trainable_params": trainable,
                "lora": ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha, "layers": lora_layers,
                          "merged": True, "peft_adapter": (ADAPTER_DIR if objective.adapter_base
                                                           is not None else None)}
                         if cfg.lora_rank else None),
                "tokenizer_hash": tokenizer.hash, "data_meta": {"path": str(data_path), **data_meta},
                "data_files": runs.data_files([data_path]),
                "device": str(device), "bf16": bf16, "hardware": runs.hardware(device),
                "versions": runs.library_versions(), "status": "training"}
        engine = Engine(model, optimizer, objective, train_cfg, folder, model_cfg, meta,
                        tokenizer, stop, callbacks, device=device, bf16=bf16, say=say)
        if folder.resuming and runs.list_checkpoints(folder.final):
            engine.restore(runs.load_checkpoint(folder.final, log=say))
        meta["tokenizer_path"] = runs.copy_tokenizer(folder.path, tokenizer).name
        runs.save_configs(folder.path, model_cfg, train_cfg, meta)
        runs.write_log(folder.path, engine.log_rows, engine.columns)
        say(f"{kind}: {len(train_items):,} train / {len(val_items):,} val examples, {planned} "
            f"steps, {trainable:,} trainable parameters"
            + (f" (LoRA rank {cfg.lora_rank} on {len(lora_layers)} layers)" if cfg.lora_rank else ""))
        done = engine.run()
    except BaseException:
        folder.abandon()  # overwrite=true: the earlier run stays as it was
        raise
    finally:
        folder.release()
    best, first = done.best, done.first_val
    result = FinetuneResult(done.run_dir, kind, done.step, objective.progress()["epoch"],
                            first[0] if first else None, best[0] if best else None,
                            best[1] if best else done.step, done.stopped,
                            best[2] if best else {}, done.status, done.exit_code)
    say(str(result))
    return result


def _config(cls, config, data, overrides):
    cfg = config or cls()
    if data is not None:
        overrides = {**overrides, "data": str(data)}
    return cfg.replace(**overrides) if overrides else cfg


def sft(run, data: str | Path | None = None, config: SFTConfig | None = None, stop=None,
        callbacks: Iterable[Callable[[dict], None]] = (), trust_experiment: bool = False,
        **overrides) -> FinetuneResult:
    """Fine-tune run ``run`` (a name or folder) on the conversations in ``data``; any
    ``SFTConfig`` field can be given as a keyword. Returns the new run's figures."""
    return finetune("sft", run, _config(SFTConfig, config, data, overrides), stop, callbacks,
                    trust_experiment)


def dpo(run, data: str | Path | None = None, config: DPOConfig | None = None, stop=None,
        callbacks: Iterable[Callable[[dict], None]] = (), trust_experiment: bool = False,
        **overrides) -> FinetuneResult:
    """Preference-tune run ``run`` with DPO on ``{"prompt", "chosen", "rejected"}`` pairs
    against a frozen copy of itself; any ``DPOConfig`` field can be given as a keyword."""
    return finetune("dpo", run, _config(DPOConfig, config, data, overrides), stop, callbacks,
                    trust_experiment)
