"""Pretraining: ``train(model_cfg, train_cfg)`` and ``python -m minlm train``.

This module sets a pretraining run up (device, tokenizer, token shards, the model, fresh or
from another run's weights with ``init_from``, the optimizer) and hands it to the one
training loop in ``minlm.engine`` with the ``Pretraining`` objective of
``minlm.objectives``: AdamW or Muon, warmup then cosine/linear/constant/warm-up-stable-decay
schedules, an optional batch-size warm-up, gradient accumulation and clipping, optional bf16
autocast and ``torch.compile``, DDP/FSDP under ``torchrun``, evaluation on a fixed held-out
set, a CSV log, atomic checkpoints with exact resume, step / epoch / time budgets, and a
graceful stop (Ctrl-C, SIGTERM or a stop flag).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from minlm import distributed, memory, runs
from minlm.config import ConfigError, ModelConfig, TrainConfig
from minlm.data import _check_split
from minlm.prepare import prepare
from minlm.distributed import resolve_device  # noqa: F401 - kept importable from train
from minlm.engine import Engine, StopFlag
from minlm.flops import cpu_bf16_is_faster, flops_per_token
from minlm.model import LM
from minlm.objectives import epochs_to_steps, objective_spec, pretraining_step_tokens
from minlm.optim import lr_at, make_optimizer
from minlm.runfolder import RunFolder
from minlm.tokenizer import load_tokenizer, shipped_tokenizer_path

__all__ = ["train", "TrainResult", "StopFlag", "lr_at", "make_optimizer", "tiny_run"]

# fields that must not change when a run is resumed: they decide the data stream and batches
RESUME_FIXED = ("data", "batch_size", "grad_accum_steps", "seed", "max_docs", "val_fraction",
                "batch_warmup_iters", "batch_warmup_start")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    val_loss: float | None
    val_bpb: float | None
    stopped: str  # "" when max_iters was reached, else why it stopped early
    status: str = "finished"  # as train_config.json records it
    exit_code: int = 0  # what the command exits with: 0, 1 (failed), 130 (Ctrl-C), 143 (SIGTERM)
    target_reached: dict | None = None  # step, tokens, elapsed_s, val_bpb at target_bpb
    val_step: int | None = None  # the step of val_loss (earlier than step after a stop)

    def __str__(self) -> str:
        figures = (f"val loss {self.val_loss:.4f}" + (f", val bits/byte {self.val_bpb:.4f}"
                                                      if self.val_bpb is not None else "")
                   if self.val_loss is not None else "no evaluation yet")
        if self.val_loss is not None and self.val_step not in (None, self.step):
            figures += f" (at step {self.val_step})"
        why = f" ({self.stopped})" if self.stopped else ""
        failed = "FAILED: " if self.status.startswith("failed") else ""
        return (f"{failed}run {self.run_dir}: step {self.step}, {self.tokens:,} tokens, "
                f"{self.elapsed_s / 60:.1f} min{why}; {figures}{saved_note(self)}")


def saved_note(result) -> str:
    """What an interrupted run (exit 130 / 143) kept: its checkpoint, and how to go on."""
    if result.exit_code not in (130, 143):
        return ""
    return f"; checkpoint of step {result.step} saved, continue with resume=true"


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 on GPUs that support it, and on CPUs where a probe finds it faster."""
    if precision == "bf16":
        return True
    if precision == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and cpu_bf16_is_faster()
    return False


def default_run_name(train_cfg: TrainConfig) -> str:
    return f"{train_cfg.preset or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _check_resume_configs(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
                          trust_experiment: bool) -> None:
    saved_model, saved_train, _ = runs.read_configs(run_dir, trust_experiment)
    diffs = [f"{k}: saved {v!r}, given {getattr(model_cfg, k)!r}"
             for k, v in saved_model.to_dict().items() if getattr(model_cfg, k) != v]
    diffs += [f"{k}: saved {getattr(saved_train, k)!r}, given {getattr(train_cfg, k)!r}"
              for k in RESUME_FIXED  # the saved record is portable: compare it so
              if getattr(saved_train, k) != runs.portable(getattr(train_cfg, k))]
    if diffs:
        raise runs.RunError(f"cannot resume {run_dir.name!r}: the config differs from the saved "
                            "run (" + "; ".join(diffs) + ")")


def _data_from_run(data: str, run_dir: Path) -> str | None:
    """A data path as seen from the run folder (relative: a copied pair of folders still
    finds it, and no machine's path shows), so a resume from any working directory finds it;
    None for a dataset name or a Hub source."""
    if not Path(data).exists():
        return None
    return os.path.relpath(Path(data).resolve(), run_dir.resolve())


def resume_data(run_dir: Path, saved: str, meta: dict) -> str:
    """The data a resumed run reads: the saved ``data`` when it resolves from here (a
    dataset name, or a path from the current directory), else the folder the run recorded
    relative to itself."""
    from minlm.data import DATASETS

    rel = meta.get("data_from_run")
    if saved in DATASETS or saved.startswith("hf:") or Path(saved).exists() or not rel:
        return saved
    found = (run_dir / rel).resolve()
    return str(found) if found.exists() else saved


def _check_resume_data(run_dir: Path, shards, cfg: TrainConfig) -> None:
    """A resumed run must read the corpus it was trained on: the shards' token counts and the
    sha256 of the source files, as the run recorded them, must match (``allow_data_change``
    continues on other data knowingly)."""
    meta = runs.read_record(run_dir)[2]  # meta only: imports nothing
    then, now = meta.get("data_meta") or {}, shards.meta
    diffs = [f"{k} {then[k]} then, {now.get(k)} now" for k in ("tokens", "tokenizer_hash")
             if k in then and then[k] != now.get(k)]
    hashes = [sorted(f["sha256"] for f in files if f.get("sha256"))
              for files in (meta.get("data_files") or [], _data_files(now))]
    if all(hashes) and hashes[0] != hashes[1]:
        diffs.append("the sha256 of its source files differ")
    if diffs and not cfg.allow_data_change:
        raise runs.RunError(f"cannot resume {run_dir.name!r}: data={cfg.data!r} is not the corpus "
                            f"it was trained on ({'; '.join(diffs)}); resume with that data, or "
                            "pass allow_data_change=true to go on with this one")


def _init_from(model_cfg: ModelConfig, cfg: TrainConfig, trust_experiment: bool):
    """The parent run of ``init_from``: its model config must be the one being trained."""
    parent = runs.load_run(cfg.init_from, runs_dir=cfg.out_dir, trust_experiment=trust_experiment)
    diffs = [f"{k}: parent {v!r}, given {getattr(model_cfg, k)!r}"
             for k, v in parent.model_config.to_dict().items() if getattr(model_cfg, k) != v]
    if diffs:
        raise ConfigError(f"init_from={cfg.init_from!r}: the model config differs from the "
                          f"parent run's ({'; '.join(diffs)}); leave the model settings as the "
                          "parent's (the command line reads them from the parent)")
    return parent


def _data_files(shards_meta: dict) -> list[dict]:
    files = [f[0] for f in shards_meta.get("key", {}).get("files", []) if Path(f[0]).is_file()]
    return runs.data_files(files)


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, stop: StopFlag | None = None,
          callbacks: Iterable[Callable[[dict], None]] = (),
          trust_experiment: bool = False) -> TrainResult:
    """Train a model and leave a complete run folder; returns the final figures.

    ``stop`` (a ``StopFlag``, e.g. a notebook's Stop button) ends the run after the current
    step; each callback receives every log row as a dict. ``trust_experiment``: as
    ``load_run``'s, for the run resumed or the ``init_from`` parent (an argument, not a
    config field, so that no run folder can record it)."""
    if train_cfg.resume and not train_cfg.run_name:
        there = ", ".join(runs.run_names(train_cfg.out_dir)) or "none"
        raise ConfigError(f"resume=true needs run_name=<the run to continue>; runs in "
                          f"{train_cfg.out_dir}: {there}")
    cfg = train_cfg if train_cfg.run_name else train_cfg.replace(run_name=default_run_name(train_cfg))
    say = tqdm.write if cfg.verbose else (lambda *a, **k: None)
    dist, device = distributed.setup(resolve_device(cfg.device))
    if cfg.batch_size % dist.world:
        raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {dist.world} "
                          "processes; batch_size is the global batch, split across processes")
    if cfg.fsdp and not dist.enabled:
        raise ConfigError("fsdp=true shards a model across processes; launch with torchrun "
                          "--nproc_per_node=N (one process would hold it all anyway)")
    main = dist.is_main
    if not main:  # only rank 0 talks and writes
        say = lambda *a, **k: None  # noqa: E731
    spec = objective_spec(cfg.objective)  # after experiment= loaded (model_cfg did)
    bf16 = use_bf16(cfg.precision, device)
    memory.check_memory(model_cfg, cfg, device)  # before any work: fail in a second
    parent = _init_from(model_cfg, cfg, trust_experiment) if cfg.init_from else None
    if parent is not None and not cfg.tokenizer:
        tok_path = runs.find_tokenizer_file(parent.path)
    else:
        tok_path = Path(cfg.tokenizer) if cfg.tokenizer else shipped_tokenizer_path(model_cfg.vocab_size)
    tokenizer = load_tokenizer(str(tok_path))
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ConfigError(
            f"tokenizer {tok_path} has {tokenizer.vocab_size} tokens but vocab_size="
            f"{model_cfg.vocab_size}; set vocab_size >= {tokenizer.vocab_size}")
    final = Path(cfg.out_dir) / cfg.run_name
    # every check that only reads comes first, before the corpus is tokenized and before
    # anything is written (the lock file included): a refused run leaves out_dir as it was
    exists = RunFolder.check(cfg.out_dir, cfg.run_name, cfg.resume, cfg.overwrite)
    state = None
    if exists and cfg.resume:
        _check_resume_configs(final, model_cfg, cfg, trust_experiment)
        if runs.list_checkpoints(final):
            state = runs.load_checkpoint(final, log=say)
    for turn in ("main", "others"):  # rank 0 tokenizes; the others then read its cache
        if (turn == "main") == main:
            shards = prepare(cfg.data, tokenizer, val_fraction=cfg.val_fraction,
                             num_workers=cfg.num_workers, max_docs=cfg.max_docs,
                             verbose=cfg.verbose and main)
        distributed.barrier(dist)
    if exists and cfg.resume:
        _check_resume_data(final, shards, cfg)
    for split in (shards.train, shards.val)[:2 if cfg.eval_iters else 1]:
        _check_split(split, model_cfg.block_size)  # data too short: refused before the folder exists
    # the folder is locked (and checked again, under the lock) once the inputs are good
    folder = RunFolder(cfg.out_dir, cfg.run_name, cfg.resume, cfg.overwrite, say) if main else None
    try:
        if cfg.epochs:
            step_tokens = cfg.batch_size * model_cfg.block_size * cfg.grad_accum_steps
            warmup = pretraining_step_tokens(cfg, model_cfg.block_size, dist.world)
            cfg = cfg.replace(max_iters=epochs_to_steps(cfg.epochs, len(shards.train), step_tokens,
                                                        warmup))
        if folder is None:  # other ranks follow rank 0's folder
            folder = RunFolder.follower(cfg.out_dir, cfg.run_name, exists and cfg.resume)
        torch.manual_seed(cfg.seed)
        model = LM(model_cfg).to(device)
        if parent is not None:
            model.load_state_dict(parent.model.state_dict())
        optimizer = make_optimizer(model, cfg, device)
        objective = spec.cls(model, shards, cfg, model_cfg,
                                torch.Generator().manual_seed(cfg.seed), device,
                                (dist.rank, dist.world))
        fwd = distributed.wrap(model, dist, device, cfg.fsdp)
        if cfg.compile:  # tracing and saving keep using the original module
            fwd = torch.compile(fwd)
        meta = {"params": model.num_params(), "params_non_embedding": model.num_params(True),
                "flops_per_token": flops_per_token(model_cfg),  # compare reads it, builds nothing
                "tokenizer_path": str(tok_path), "tokenizer_hash": tokenizer.hash,
                "data_meta": shards.meta, "data_files": _data_files(shards.meta),
                "data_from_run": _data_from_run(cfg.data, final),
                "objective": spec.name, "bpb_is_bound": spec.bpb_is_bound,
                "device": str(device), "bf16": bf16,
                "hardware": runs.hardware(device), "world_size": dist.world,
                "versions": runs.library_versions(), "status": "training",
                **({"parent": parent.name} if parent is not None else {})}
        engine = Engine(model, optimizer, objective, cfg, folder, model_cfg, meta, tokenizer,
                        stop, callbacks, dist, device, fwd, bf16, say)
        if folder.resuming and state is not None:
            engine.restore(state)
        elif folder.resuming:
            say(f"{cfg.run_name} has no checkpoint yet; starting it from step 0")
        if main:
            runs.save_configs(folder.path, model_cfg, cfg, meta)
            runs.copy_tokenizer(folder.path, tokenizer)
            runs.write_log(folder.path, engine.log_rows, engine.columns)
        out = engine.run()
    except BaseException:
        if folder is not None:
            folder.abandon()  # overwrite=true: the earlier run stays as it was
        raise
    finally:
        if folder is not None:
            folder.release()
    distributed.cleanup(dist)
    val = out.last_val
    result = TrainResult(out.run_dir, out.step, out.tokens, out.elapsed_s,
                         val[0] if val else None, val[1].get("bpb") if val else None,
                         out.stopped, out.status, out.exit_code, out.target_reached,
                         out.last_val_step)
    say(str(result))
    return result


def tiny_run(out_dir: str | Path, name: str = "tiny-demo", preset: str = "llama-1m",
             steps: int = 30, **model_overrides) -> Path:
    """Train a very small model for a few steps, for notebooks and demos with no run at hand.

    Returns the run folder (reused if it already exists and finished)."""
    out_dir = Path(out_dir)
    if (out_dir / name / runs.WEIGHTS).exists():
        return out_dir / name
    shape = dict(dim=64, n_layers=2, n_heads=2, n_kv_heads=0, block_size=64, vocab_size=512)
    model_cfg = ModelConfig.from_preset(preset, **{**shape, **model_overrides})
    cfg = TrainConfig(preset=preset, run_name=name, out_dir=str(out_dir), max_iters=steps,
                      batch_size=8, warmup_iters=5, eval_interval=max(1, steps // 3), eval_iters=2,
                      log_interval=5, max_docs=300, overwrite=True, verbose=False)
    return train(model_cfg, cfg).run_dir


# --- seed groups (minlm.seeds finds and judges them) ------------------------------------

def seed_configs(train_cfg: TrainConfig, seeds: int) -> list[TrainConfig]:
    """The sibling configs of a group: run ``<run_name>-s<i>`` with seed ``seed + i`` and
    ``group=<run_name>`` (a run name derived from the preset and time when none is given)."""
    from minlm.seeds import check_seeds

    check_seeds(seeds)
    base = train_cfg.run_name or default_run_name(train_cfg)
    return [train_cfg.replace(run_name=f"{base}-s{i}", seed=train_cfg.seed + i, group=base)
            for i in range(seeds)]


def train_seeds(model_cfg, train_cfg: TrainConfig, seeds: int, stop=None, callbacks=(),
                trust_experiment: bool = False):
    """Train ``seeds`` seeds of one recipe one after the other (``seed_configs``); returns
    their ``TrainResult``s. With ``resume=true`` a sibling that exists continues and one that
    does not yet starts; a sibling that ends early (Ctrl-C, a failure) ends the group there."""
    results = []
    for cfg in seed_configs(train_cfg, seeds):
        exists = (Path(cfg.out_dir) / cfg.run_name).is_dir()
        result = train(model_cfg, cfg.replace(resume=cfg.resume and exists), stop, callbacks,
                       trust_experiment)
        results.append(result)
        if result.exit_code:
            break
    return results
