"""The training loop: ``train(model_cfg, train_cfg)`` and ``python -m minlm train``.

AdamW with decoupled weight decay on matrices, linear warmup then cosine/linear/constant
decay, gradient accumulation and clipping, optional bf16 autocast and ``torch.compile``,
evaluation on a fixed held-out set, a CSV log, atomic checkpoints with exact resume, and a
graceful stop (Ctrl-C or a stop flag) that finishes the step and saves everything.
"""

from __future__ import annotations

import contextlib
import math
import shutil
import signal
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
from tqdm.auto import tqdm

from minlm import distributed, runs
from minlm.config import ConfigError, ModelConfig, TrainConfig
from minlm.evaluate import bits_per_byte, estimate_loss
from minlm.flops import cpu_bf16_is_faster, flops_per_token, peak_flops
from minlm.model import LM
from minlm.optim import make_optimizer, set_lr

__all__ = ["train", "Trainer", "TrainResult", "StopFlag", "lr_at", "make_optimizer"]

# fields that must not change when a run is resumed: they decide the data stream and batches
RESUME_FIXED = ("data", "batch_size", "grad_accum_steps", "seed", "max_docs", "val_fraction")


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    val_loss: float | None
    val_bpb: float | None
    stopped: str  # "" when max_iters was reached, else why it stopped early

    def __str__(self) -> str:
        figures = (f"val loss {self.val_loss:.4f}, val bits/byte {self.val_bpb:.4f}"
                   if self.val_loss is not None else "no evaluation yet")
        why = f" ({self.stopped})" if self.stopped else ""
        return (f"run {self.run_dir}: step {self.step}, {self.tokens:,} tokens, "
                f"{self.elapsed_s / 60:.1f} min{why}; {figures}")


class StopFlag:
    """Ask a running ``train()`` to stop after its current step (thread-safe)."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""

    def set(self, reason: str = "stop requested") -> None:
        self.reason = self.reason or reason
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device='cuda' is invalid: no CUDA device is available; use device=cpu")
    return torch.device(name)


def use_bf16(precision: str, device: torch.device) -> bool:
    """``auto``: bf16 on GPUs that support it, and on CPUs where a probe finds it faster."""
    if precision == "bf16":
        return True
    if precision == "auto":
        if device.type == "cuda":
            return torch.cuda.is_bf16_supported()
        return device.type == "cpu" and cpu_bf16_is_faster()
    return False


def lr_at(step: int, cfg: TrainConfig, progress: float | None = None) -> float:
    """Learning rate for 0-based ``step``: linear warmup, then decay to ``lr * min_lr_ratio``.

    ``progress`` (0..1) overrides ``step / max_iters`` for the decay, e.g. for time budgets.
    """
    if step < cfg.warmup_iters:
        return cfg.lr * (step + 1) / cfg.warmup_iters
    if cfg.schedule == "constant":
        return cfg.lr
    if progress is None:
        span = max(1, cfg.max_iters - cfg.warmup_iters)
        progress = (step - cfg.warmup_iters) / span
    progress = min(max(progress, 0.0), 1.0)
    min_lr = cfg.lr * cfg.min_lr_ratio
    if cfg.schedule == "linear":
        return min_lr + (cfg.lr - min_lr) * (1 - progress)
    return min_lr + 0.5 * (cfg.lr - min_lr) * (1 + math.cos(math.pi * progress))


def default_run_name(train_cfg: TrainConfig) -> str:
    return f"{train_cfg.preset or 'model'}-{time.strftime('%Y%m%d-%H%M%S')}"


def _prepare_run_dir(run_dir: Path, cfg: TrainConfig) -> bool:
    """Create or reuse the folder; returns True when there is a run to resume."""
    exists = runs.check_run_target(run_dir, resume=cfg.resume, overwrite=cfg.overwrite)
    if exists and cfg.overwrite:
        shutil.rmtree(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    return exists and cfg.resume


def _check_resume_configs(run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig) -> None:
    saved_model, saved_train, _ = runs.read_configs(run_dir)
    diffs = [f"{k}: saved {v!r}, given {getattr(model_cfg, k)!r}"
             for k, v in saved_model.to_dict().items() if getattr(model_cfg, k) != v]
    diffs += [f"{k}: saved {getattr(saved_train, k)!r}, given {getattr(train_cfg, k)!r}"
              for k in RESUME_FIXED if getattr(saved_train, k) != getattr(train_cfg, k)]
    if diffs:
        raise runs.RunError(f"cannot resume {run_dir.name!r}: the config differs from the saved "
                            "run (" + "; ".join(diffs) + ")")


def train(model_cfg: ModelConfig, train_cfg: TrainConfig, stop: StopFlag | None = None,
          callbacks: Iterable[Callable[[dict], None]] = ()) -> TrainResult:
    """Train a model and leave a complete run folder; returns the final figures."""
    return Trainer(model_cfg, train_cfg, stop, callbacks).run()


class Trainer:
    """One training run: set up data, model and folder, then step, log, evaluate, checkpoint."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, stop: StopFlag | None = None,
                 callbacks: Iterable[Callable[[dict], None]] = ()):
        from minlm.data import prepare
        from minlm.tokenizer import load_tokenizer, shipped_tokenizer_path

        cfg = train_cfg if train_cfg.run_name else train_cfg.replace(run_name=default_run_name(train_cfg))
        self.model_cfg, self.cfg, self.callbacks = model_cfg, cfg, list(callbacks)
        self.stop = stop or StopFlag()
        self.say = tqdm.write if cfg.verbose else (lambda *a, **k: None)
        self.dist, self.device = distributed.setup(resolve_device(cfg.device))
        if cfg.batch_size % self.dist.world:
            raise ConfigError(f"batch_size={cfg.batch_size} is not divisible by the {self.dist.world} "
                              "processes; batch_size is the global batch, split across processes")
        if cfg.fsdp and not self.dist.enabled:
            raise ConfigError("fsdp=true shards a model across processes; launch with torchrun "
                              "--nproc_per_node=N (one process would hold it all anyway)")
        main = self.dist.is_main
        if not main:  # only rank 0 talks and writes
            self.say = lambda *a, **k: None
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.autocast = ((lambda: torch.autocast(self.device.type, dtype=torch.bfloat16))
                         if self.bf16 else contextlib.nullcontext)

        runs.check_memory(model_cfg, cfg, self.device)  # before any work: fail in a second
        runs.check_run_target(Path(cfg.out_dir) / cfg.run_name, resume=cfg.resume,
                              overwrite=cfg.overwrite)  # before tokenizing the corpus
        tok_path = Path(cfg.tokenizer) if cfg.tokenizer else shipped_tokenizer_path(model_cfg.vocab_size)
        self.tokenizer = load_tokenizer(str(tok_path))
        if self.tokenizer.vocab_size > model_cfg.vocab_size:
            raise ConfigError(
                f"tokenizer {tok_path} has {self.tokenizer.vocab_size} tokens but vocab_size="
                f"{model_cfg.vocab_size}; set vocab_size >= {self.tokenizer.vocab_size}")
        for turn in ("main", "others"):  # rank 0 tokenizes; the others then read its cache
            if (turn == "main") == main:
                self.shards = prepare(cfg.data, self.tokenizer, val_fraction=cfg.val_fraction,
                                      num_workers=cfg.num_workers, max_docs=cfg.max_docs,
                                      verbose=cfg.verbose and main)
            distributed.barrier(self.dist)
        from minlm.data import _check_split  # data too short: refused before the folder exists

        for split in (self.shards.train, self.shards.val)[:2 if cfg.eval_iters else 1]:
            _check_split(split, model_cfg.block_size)

        self.run_dir = Path(cfg.out_dir) / cfg.run_name
        exists = self.run_dir.is_dir() and any(self.run_dir.iterdir())
        if main:
            resuming = _prepare_run_dir(self.run_dir, cfg)
            if resuming:
                _check_resume_configs(self.run_dir, model_cfg, cfg)
        distributed.barrier(self.dist)
        resuming = exists and cfg.resume
        torch.manual_seed(cfg.seed)
        self.model = LM(model_cfg).to(self.device)
        self.optimizer = make_optimizer(self.model, cfg, self.device)
        self.batch_gen = torch.Generator().manual_seed(cfg.seed)
        self.step, self.tokens, self.elapsed_prev = 0, 0, 0.0
        self.log_rows: list[dict] = []
        if resuming and runs.list_checkpoints(self.run_dir):
            self._restore(runs.load_checkpoint(self.run_dir, log=self.say))
        elif resuming:
            self.say(f"{self.run_dir.name} has no checkpoint yet; starting it from step 0")
        self.meta = {"params": self.model.num_params(),
                     "params_non_embedding": self.model.num_params(True),
                     "tokenizer_path": str(tok_path), "tokenizer_hash": self.tokenizer.hash,
                     "data_meta": self.shards.meta, "device": str(self.device), "bf16": self.bf16,
                     "hardware": runs.hardware(self.device),
                     "world_size": self.dist.world,
                     "versions": runs.library_versions(), "status": "training"}
        if main:
            runs.save_configs(self.run_dir, model_cfg, cfg, self.meta)
            runs.copy_tokenizer(self.run_dir, self.tokenizer)
            runs.write_log(self.run_dir, self.log_rows)
        self.fwd = distributed.wrap(self.model, self.dist, self.device, cfg.fsdp)
        if cfg.compile:  # tracing and saving keep using self.model, the original module
            self.fwd = torch.compile(self.fwd)
        self.flops_per_token = flops_per_token(model_cfg)
        self.peak_flops = peak_flops(self.device, self.bf16)
        self.last_val: tuple[float, float] | None = None
        self.budget_reason = f"time budget of {cfg.max_minutes} min reached"
        self.bad_in_a_row = 0
        self.skipped_steps = 0

    # --- state ---------------------------------------------------------------------------
    def _restore(self, state: dict) -> None:
        if state.get("tokenizer_hash") not in (None, self.tokenizer.hash):
            raise runs.RunError(f"cannot resume {self.run_dir.name!r}: its checkpoint was made with "
                                f"tokenizer {state['tokenizer_hash'][:12]}, this run uses "
                                f"{self.tokenizer.hash[:12]}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.batch_gen.set_state(state["batch_rng"])
        torch.set_rng_state(state["torch_rng"])
        self.step, self.tokens, self.elapsed_prev = state["step"], state["tokens"], state["elapsed_s"]
        self.log_rows = list(state["log_rows"])
        self.say(f"resuming {self.run_dir.name} from step {self.step}")

    def _should_stop(self) -> bool:
        """The stop flag, agreed across processes so that all stop after the same step."""
        if distributed.any_rank(self.stop.is_set(), self.dist, self.device) and not self.stop.is_set():
            self.stop.set("another process stopped")
        return self.stop.is_set()

    def elapsed(self) -> float:
        return self.elapsed_prev + time.perf_counter() - self.start_time

    def checkpoint(self) -> bool:
        """Write checkpoint, weights and log; False (and a stop) when the disk is too full."""
        model_state = distributed.full_state_dict(self.model, self.dist, self.cfg.fsdp)
        if not self.dist.is_main:
            return True
        state = {"model": model_state, "optimizer": self.optimizer.state_dict(),
                 "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed(),
                 "batch_rng": self.batch_gen.get_state(), "torch_rng": torch.get_rng_state(),
                 "log_rows": self.log_rows, "tokenizer_hash": self.tokenizer.hash,
                 "model_config": self.model_cfg.to_dict(), "versions": runs.library_versions()}
        problem = runs.disk_space_problem(self.run_dir, self.model)
        if problem:
            self.stop.set(problem)
            self.say(f"not saving a checkpoint at step {self.step}: {problem}")
            return False
        runs.save_checkpoint(self.run_dir, state, self.step, self.cfg.keep_checkpoints)
        runs.save_weights(self.run_dir, self.model, model_state)
        runs.write_log(self.run_dir, self.log_rows)
        return True

    # --- the loop ------------------------------------------------------------------------
    def lr(self) -> float:
        cfg, progress = self.cfg, None
        if cfg.max_minutes:  # decay by whichever runs out first: steps or the time budget
            by_steps = (self.step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
            progress = max(by_steps, self.elapsed() / (60 * cfg.max_minutes))
        return lr_at(self.step, cfg, progress)

    def train_step(self, lr: float) -> tuple[float, float]:
        """One optimizer step (with accumulation); returns (loss, grad norm), maybe non-finite."""
        from minlm.data import get_batch

        cfg, T = self.cfg, self.model_cfg.block_size
        set_lr(self.optimizer, lr, cfg.lr)
        loss_sum = aux_sum = 0.0
        shard = (self.dist.rank, self.dist.world)
        for micro in range(cfg.grad_accum_steps):
            x, y = get_batch(self.shards.train, cfg.batch_size, T, self.batch_gen, self.device, shard)
            sync = micro == cfg.grad_accum_steps - 1 or not hasattr(self.fwd, "no_sync")
            with self.autocast(), (contextlib.nullcontext() if sync else self.fwd.no_sync()):
                _, loss = self.fwd(x, y, return_logits=False)  # fused head + loss
                (loss / cfg.grad_accum_steps).backward()
            loss_sum += loss.item()
            aux_sum += float(self.model.aux_loss)  # MoE load balance; 0 without experts
        loss_sum = distributed.mean_across_ranks(loss_sum, self.dist, self.device)
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip).item()
        self.last_aux = aux_sum / cfg.grad_accum_steps
        # log the cross-entropy alone, so runs with and without experts compare
        loss = loss_sum / cfg.grad_accum_steps - self.model_cfg.aux_loss_weight * self.last_aux
        if math.isfinite(loss) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:  # skip the update; the weights stay as they were
            self.bad_in_a_row += 1
            self.skipped_steps += 1
            what = "loss" if not math.isfinite(loss) else "gradient norm"
            self.say(f"step {self.step + 1}: non-finite {what} ({loss=}, {grad_norm=}) at "
                     f"lr {lr:.3g}; update skipped ({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row >= cfg.max_bad_steps:
                self.stop.set(f"{self.bad_in_a_row} non-finite steps in a row, the first at step "
                              f"{self.step + 2 - self.bad_in_a_row} (lr {lr:.3g}); lower lr or "
                              "check the data")
        self.optimizer.zero_grad(set_to_none=True)
        return loss, grad_norm

    def log(self, lr: float, loss: float, grad_norm: float, interval: tuple[float, int],
            force_eval: bool = False) -> None:
        cfg, T = self.cfg, self.model_cfg.block_size
        now = time.perf_counter()
        row = {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.elapsed(), 3),
               "lr": lr, "train_loss": loss, "val_loss": None, "val_bpb": None,
               "tokens_per_s": round(interval[1] / max(now - interval[0], 1e-9), 1),
               "grad_norm": grad_norm, "aux_loss": self.last_aux,
               "mfu": None,
               "train_bpb": bits_per_byte(loss, 1, self.shards.bytes_per_token("train"))}
        at_eval = self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters or force_eval
        if at_eval and cfg.eval_iters:
            val = estimate_loss(self.model, self.shards.val, T, cfg.eval_batch_size or cfg.batch_size,
                                cfg.eval_iters, self.device, self.autocast if self.bf16 else None)
            self.last_val = (val, bits_per_byte(val, 1, self.shards.bytes_per_token("val")))
            row["val_loss"], row["val_bpb"] = self.last_val
            self.say(f"step {self.step}: train loss {loss:.4f}, val loss {val:.4f}, "
                     f"val bits/byte {self.last_val[1]:.4f}, {row['tokens_per_s']:,.0f} tok/s")
        if self.peak_flops:
            row["mfu"] = round(row["tokens_per_s"] * self.flops_per_token
                               / (self.peak_flops * self.dist.world), 4)
        self.log_rows.append(row)
        if self.dist.is_main:
            runs.append_log_row(self.run_dir, row)
        for cb in self.callbacks:
            cb(row)

    def run(self) -> TrainResult:
        cfg = self.cfg
        self.start_time = time.perf_counter()
        interval = (self.start_time, 0)
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGINT,
                                             lambda *_: self.stop.set("interrupted (Ctrl-C)"))
        # on a time budget the bar counts seconds of the budget (a large max_iters would give a
        # bogus ETA); otherwise steps of max_iters
        budget_s = 60 * cfg.max_minutes if cfg.max_minutes else 0.0
        bar = tqdm(total=round(budget_s) if budget_s else cfg.max_iters,
                   initial=min(round(self.elapsed()), round(budget_s)) if budget_s else self.step,
                   unit="s" if budget_s else "step", disable=not (cfg.verbose and self.dist.is_main),
                   dynamic_ncols=True, desc=self.run_dir.name)
        last_step_s = last_eval_s = 0.0  # to end a budgeted run before it overruns
        self.model.train()
        saved = ended = True
        try:
            ended = False
            while self.step < cfg.max_iters and not self._should_stop():
                lr = self.lr()
                t0 = time.perf_counter()
                loss, grad_norm = self.train_step(lr)
                last_step_s = time.perf_counter() - t0
                self.step += 1
                step_tokens = cfg.batch_size * self.model_cfg.block_size * cfg.grad_accum_steps
                self.tokens += step_tokens
                interval = (interval[0], interval[1] + step_tokens)
                bar.update(min(round(self.elapsed()), round(budget_s)) - bar.n if budget_s else 1)
                at_eval = self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters
                # stop when another step and the final evaluation would not fit in the budget
                out_of_time = bool(budget_s) and self.elapsed() + last_step_s + last_eval_s > budget_s
                if out_of_time:  # the run ends here, on an evaluation
                    self.stop.set(self.budget_reason)
                stopping = self.stop.is_set()  # the last step is logged, so the log ends where the run does
                if self.step % cfg.log_interval == 0 or at_eval or out_of_time or stopping:
                    t0 = time.perf_counter()
                    self.log(lr, loss, grad_norm, interval, force_eval=out_of_time)
                    if self.log_rows[-1]["val_loss"] is not None:
                        last_eval_s = time.perf_counter() - t0
                    left = (f"{max(0.0, cfg.max_minutes - self.elapsed() / 60):.1f}"
                            if cfg.max_minutes else None)
                    bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.log_rows[-1]['tokens_per_s']:,.0f}",
                                    **({"min_left": left} if left else {}))
                    interval = (time.perf_counter(), 0)
                if self.step % cfg.checkpoint_interval == 0 and not self.bad_in_a_row:
                    saved = self.checkpoint()
            ended = True
        except (RuntimeError, MemoryError) as e:
            if not runs.is_out_of_memory(e):
                raise
            raise MemoryError(runs.oom_message(self.model, cfg, self.model_cfg)) from None
        finally:
            if ended:  # a stop or the budget ends the bar as done, not red (tqdm's error look)
                bar.total = bar.n = max(bar.n, 1)
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        self._should_stop()  # every rank agrees on why it stopped
        if self.bad_in_a_row:  # keep the last good checkpoint rather than save a bad state
            self.say(f"keeping the last good checkpoint; {self.skipped_steps} steps were skipped")
        elif saved:
            saved = self.checkpoint()
        stopped = self.stop.reason if self.stop.is_set() else ""
        planned = stopped == self.budget_reason  # the time budget is a normal end, not a stop
        self.meta["status"] = ("finished" if not stopped else f"finished: {stopped}" if planned
                               else f"stopped at step {self.step}: {stopped}")
        self.meta["skipped_steps"] = self.skipped_steps
        if self.dist.is_main:
            runs.save_configs(self.run_dir, self.model_cfg, cfg, self.meta)
        distributed.cleanup(self.dist)
        result = TrainResult(self.run_dir, self.step, self.tokens, self.elapsed(),
                             self.last_val[0] if self.last_val else None,
                             self.last_val[1] if self.last_val else None, stopped)
        self.say(str(result) + ("; resume with resume=true" if stopped and not planned else ""))
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
