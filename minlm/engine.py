"""The one training loop, shared by pretraining, SFT and DPO.

The engine owns what every kind of training shares: the run folder (lock, staged overwrite),
checkpoints and exact resume, step and time budgets, the evaluation schedule, the progress
bar, Ctrl-C / SIGTERM / the stop button, out-of-memory advice, the non-finite-loss policy,
the log and DDP/FSDP. What is trained is an ``Objective`` (see ``minlm.objectives``): a small
object that hands out batches, computes a batch's loss and the held-out figures, and saves
its data position. A new kind of training (distillation, say) is a new ``Objective``.

The policies, the same for every objective:

- a non-finite loss or gradient norm skips the update; ``max_bad_steps`` in a row stop the
  run as failed (exit 1), keeping the last good checkpoint;
- a checkpoint that cannot be written (too little free space, a write error) stops the run
  as failed, with the previous checkpoint untouched (every file is written atomically);
- Ctrl-C and SIGTERM finish the current step, save a checkpoint and exit 130 / 143;
- time budgets, early stopping, ``stop_at_bpb`` and the stop button are normal ends (exit 0).

With ``target_bpb`` (or ``stop_at_bpb``) the first evaluation at or below that validation
bits per byte is recorded as ``target_reached`` (step, tokens, elapsed_s, val_bpb) in the
run's meta, so one run answers both "how long to the target" and "how low by the budget".

The log has ``runs.LOG_COLUMNS`` followed by the objective's own ``columns``.
"""

from __future__ import annotations

import contextlib
import math
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch
from tqdm.auto import tqdm

from minlm import distributed, memory, runs
from minlm.config import ModelConfig, TrainConfig
from minlm.flops import device_peak, flops_per_token, raise_cpu_peak
from minlm.loggers import make_loggers
from minlm.optim import lr_at, set_lr
from minlm.runfolder import RunFolder

EXIT_CODES = {"interrupt": 130, "sigterm": 143, "failed": 1}
TIME_EVALS = 20  # a run on a time budget evaluates at least this many times over it


class StopFlag:
    """Ask a running training to stop after its current step (thread-safe).

    ``kind`` says how the run should end: "stop" (a normal end), "interrupt" (Ctrl-C),
    "sigterm", or "failed"; the first reason given wins."""

    def __init__(self):
        self._event = threading.Event()
        self.reason = ""
        self.kind = ""

    def set(self, reason: str = "stop requested", kind: str = "stop") -> None:
        if not self._event.is_set():
            self.reason, self.kind = reason, kind
        self._event.set()

    def is_set(self) -> bool:
        return self._event.is_set()


@dataclass
class StepOut:
    """What an objective returns for one batch."""

    loss: torch.Tensor  # what is backpropagated
    value: float  # what is logged as train_loss (e.g. the cross-entropy without an aux term)
    tokens: int  # tokens this batch processed (global across processes)
    figures: dict = field(default_factory=dict)  # more figures for the log row


class Objective:
    """What one kind of training computes. Subclasses implement the methods that raise."""

    kind = ""
    columns: list[str] = []  # log columns beyond runs.LOG_COLUMNS
    eval_at_start = False  # log a step-0 evaluation (fine-tuning: the parent's figure)
    final_is_best = False  # the run's weights are its best evaluation's (fine-tuning)

    def begin_step(self, step: int) -> None:
        """Called before the batches of 0-based optimizer step ``step`` (a batch size that
        changes with the step, say)."""

    def next_batch(self) -> Any:
        """The next batch, or None when the data is used up (the run ends there)."""
        raise NotImplementedError

    def loss(self, fwd, batch) -> StepOut:
        raise NotImplementedError

    def evaluate(self) -> tuple[float, dict] | None:
        """(held-out loss, other figures) in eval mode, or None without held-out data."""
        raise NotImplementedError

    def state_dict(self) -> dict:
        """The data position, so that a resumed run draws the batches it would have drawn."""
        raise NotImplementedError

    def load_state_dict(self, state: dict) -> None:
        raise NotImplementedError

    def epoch_ended(self) -> bool:
        """True right after the last batch of an epoch (an evaluation is due)."""
        return False

    def progress(self) -> dict:
        """Figures for the row about where the data stands, e.g. ``{"epoch": 1.5}``."""
        return {}

    def row_figures(self, train_loss: float) -> dict:
        """Figures derived from the logged loss, e.g. train bits per byte."""
        return {}

    def export(self, model: torch.nn.Module) -> torch.nn.Module:
        """The plain ``LM`` whose weights the run folder keeps (LoRA: merged)."""
        return model

    def save_beside(self, model: torch.nn.Module, run_dir: Path) -> None:
        """Files the run folder keeps beside its weights (LoRA: the adapter, as peft saves it)."""


@dataclass
class Outcome:
    run_dir: Path
    step: int
    tokens: int
    elapsed_s: float
    last_val: tuple[float, dict] | None
    best: tuple[float, int, dict] | None  # (val loss, step, figures) of the best evaluation
    stopped: str  # "" when the budget ran out normally, else why it ended early
    status: str
    exit_code: int
    first_val: tuple[float, dict] | None = None
    target_reached: dict | None = None  # the first evaluation at or below the target bpb
    last_val_step: int | None = None  # the step of last_val (earlier than step after a stop)


class Engine:
    """One run of one objective: step, log, evaluate, checkpoint, stop; see the module doc."""

    def __init__(self, model: torch.nn.Module, optimizer, objective: Objective, cfg: TrainConfig,
                 folder: RunFolder, model_cfg: ModelConfig, meta: dict, tokenizer=None,
                 stop: StopFlag | None = None, callbacks: Iterable[Callable[[dict], None]] = (),
                 dist: distributed.DistInfo | None = None, device=torch.device("cpu"),
                 fwd: torch.nn.Module | None = None, bf16: bool = False, say=None):
        self.model, self.optimizer, self.objective, self.cfg = model, optimizer, objective, cfg
        self.folder, self.model_cfg, self.meta, self.tokenizer = folder, model_cfg, meta, tokenizer
        self.stop, self.callbacks = stop or StopFlag(), list(callbacks)
        self.dist, self.device = dist or distributed.DistInfo(), torch.device(device)
        self.fwd = fwd if fwd is not None else model
        self.bf16 = bf16
        self.say = say or (lambda *a, **k: None)
        self.columns = runs.LOG_COLUMNS + [c for c in objective.columns if c not in runs.LOG_COLUMNS]
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.step = self.tokens = 0
        self.elapsed_prev = 0.0
        self.log_rows: list[dict] = []
        self.last_val: tuple[float, dict] | None = None
        self.last_val_step: int | None = None
        self.first_val: tuple[float, dict] | None = None
        self.best: tuple[float, int, dict, dict | None] | None = None  # val, step, figs, weights
        self.worse = 0  # evaluations in a row above the best
        self.bad_in_a_row = self.skipped_steps = 0
        self.resumed = False
        self.keep_best = cfg.keep_best or objective.final_is_best
        self.flops_per_token = flops_per_token(model_cfg)
        self.peak = device_peak(self.device, bf16)  # what MFU divides by; the run records it
        self.peak_flops = self.peak["flops"] if self.peak else None
        self._remeasured = False
        if self.peak:
            self.meta["peak_flops"] = dict(self.peak)
        self.budget_reason = f"time budget of {cfg.max_minutes} min reached"
        self.target = cfg.target_bpb or cfg.stop_at_bpb  # 0: no target
        self.target_reason = f"reached the target of {cfg.stop_at_bpb} val bits/byte"
        self.target_reached: dict | None = None
        self.loggers: list = []  # TensorBoard / MLflow, opened when the run starts

    @property
    def run_dir(self) -> Path:
        return self.folder.path

    def autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- state ---------------------------------------------------------------------------
    def state_dict(self, model_state: dict) -> dict:
        best = None
        if self.best is not None:
            best = {"val": self.best[0], "step": self.best[1], "figures": self.best[2],
                    "weights": self.best[3]}
        return {"model": model_state, "optimizer": self.optimizer.state_dict(),
                "step": self.step, "tokens": self.tokens, "elapsed_s": self.elapsed(),
                "torch_rng": torch.get_rng_state(), "data": self.objective.state_dict(),
                "log_rows": self.log_rows, "best": best, "worse": self.worse,
                "first_val": self.first_val, "skipped_steps": self.skipped_steps,
                "target_reached": self.target_reached,
                "tokenizer_hash": getattr(self.tokenizer, "hash", None),
                "model_config": self.model_cfg.to_dict(), "versions": runs.library_versions()}

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint: weights, optimizer, RNG, data position, log, best."""
        expected = getattr(self.tokenizer, "hash", None)
        if state.get("tokenizer_hash") not in (None, expected):
            raise runs.RunError(f"cannot resume {self.folder.final.name!r}: its checkpoint was made "
                                f"with tokenizer {state['tokenizer_hash'][:12]}, this run uses "
                                f"{expected[:12]}")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        torch.set_rng_state(state["torch_rng"])
        self.objective.load_state_dict(state["data"])
        self.step, self.tokens, self.elapsed_prev = state["step"], state["tokens"], state["elapsed_s"]
        self.log_rows = list(state["log_rows"])
        best = state.get("best")
        self.best = (best["val"], best["step"], best["figures"], best["weights"]) if best else None
        self.worse = state.get("worse", 0)
        self.first_val = state.get("first_val")
        self.skipped_steps = state.get("skipped_steps", 0)
        self.target_reached = state.get("target_reached")
        # the last evaluation so far is the run's figure until the next one (a stop right
        # after a resume would otherwise report "no evaluation yet" beside a curve of them)
        for row in reversed(self.log_rows):
            if row.get("val_loss") is not None:
                self.last_val = (row["val_loss"], {k[4:]: v for k, v in row.items()
                                                   if k.startswith("val_") and k != "val_loss"
                                                   and v is not None})
                self.last_val_step = row["step"]
                break
        self.resumed = True
        self.say(f"resuming {self.folder.final.name} from step {self.step}")

    def elapsed(self) -> float:
        return self.elapsed_prev + time.perf_counter() - self.start_time

    def fail(self, reason: str) -> None:
        self.stop.set(reason, "failed")
        self.say(f"step {self.step}: {reason}")

    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _save_weights(self, model_state: dict | None = None) -> None:
        exported = self.objective.export(self.model)
        runs.save_weights(self.run_dir, exported, model_state if exported is self.model else None)
        self.objective.save_beside(self.model, self.run_dir)

    def checkpoint(self) -> bool:
        """Checkpoint, weights and log; False (and a failed stop) when they cannot be written."""
        model_state = distributed.full_state_dict(self.model, self.dist, self.cfg.fsdp)
        if not self.dist.is_main:
            return True
        problem = memory.disk_space_problem(self.run_dir, self.model)
        if problem:
            self.fail(f"not saving a checkpoint at step {self.step}: {problem}")
            return False
        try:
            runs.save_checkpoint(self.run_dir, self.state_dict(model_state), self.step,
                                 self.cfg.keep_checkpoints)
            self._save_weights(model_state)
            runs.write_log(self.run_dir, self.log_rows, self.columns)
        except OSError as e:
            self.fail(str(e))  # "could not write <file>: why" (runs._write_errors)
            return False
        self.folder.promote()  # overwrite=true: the old run goes only now
        self.last_checkpoint = self.step
        return True

    def _should_stop(self) -> bool:
        """The stop flag, agreed across processes so that all stop after the same step."""
        if distributed.any_rank(self.stop.is_set(), self.dist, self.device) and not self.stop.is_set():
            self.stop.set("another process stopped")
        return self.stop.is_set()

    # --- one step --------------------------------------------------------------------------
    def lr(self) -> float:
        cfg, progress = self.cfg, None
        if cfg.max_minutes:  # decay by whichever runs out first: steps or the time budget
            by_steps = (self.step - cfg.warmup_iters) / max(1, cfg.max_iters - cfg.warmup_iters)
            progress = max(by_steps, self.elapsed() / (60 * cfg.max_minutes))
        return lr_at(self.step, cfg, progress)

    def train_step(self, lr: float) -> tuple[float, float, dict, int] | None:
        """One optimizer step with accumulation: (loss, grad norm, figures, tokens), or None
        when the data ran out. A non-finite loss or gradient norm skips the update."""
        cfg = self.cfg
        set_lr(self.optimizer, lr, cfg.lr)
        value_sum, tokens, figures = 0.0, 0, {}
        self.objective.begin_step(self.step)
        for micro in range(cfg.grad_accum_steps):
            batch = self.objective.next_batch()
            if batch is None:
                self.optimizer.zero_grad(set_to_none=True)
                return None
            sync = micro == cfg.grad_accum_steps - 1 or not hasattr(self.fwd, "no_sync")
            with self.autocast(), (contextlib.nullcontext() if sync else self.fwd.no_sync()):
                out = self.objective.loss(self.fwd, batch)
                (out.loss / cfg.grad_accum_steps).backward()
            value_sum += out.value
            tokens += out.tokens
            for k, v in out.figures.items():
                figures[k] = figures.get(k, 0.0) + v / cfg.grad_accum_steps
        value = distributed.mean_across_ranks(value_sum, self.dist, self.device) / cfg.grad_accum_steps
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, clip).item()
        if math.isfinite(value) and math.isfinite(grad_norm):
            self.optimizer.step()
            self.bad_in_a_row = 0
        else:  # skip the update; the weights stay as they were
            self.bad_in_a_row += 1
            self.skipped_steps += 1
            what = "loss" if not math.isfinite(value) else "gradient norm"
            self.say(f"step {self.step + 1}: non-finite {what} (loss={value}, grad_norm="
                     f"{grad_norm}) at lr {lr:.3g}; update skipped ({self.bad_in_a_row} in a row)")
            if self.bad_in_a_row >= cfg.max_bad_steps:
                self.fail(f"diverged: {self.bad_in_a_row} non-finite steps in a row, the first at "
                          f"step {self.step + 2 - self.bad_in_a_row} (lr {lr:.3g}); lower lr or "
                          "check the data")
        self.optimizer.zero_grad(set_to_none=True)
        return value, grad_norm, figures, tokens

    # --- log and evaluation ---------------------------------------------------------------
    def evaluate(self) -> tuple[float, dict] | None:
        was = self.model.training
        self.model.eval()
        try:
            with torch.no_grad(), self.autocast():
                return self.objective.evaluate()
        finally:
            self.model.train(was)

    def _emit(self, row: dict) -> None:
        self.log_rows.append(row)
        if self.dist.is_main:
            try:
                runs.append_log_row(self.run_dir, row, self.columns)
            except OSError as e:  # the log is rewritten whole at the next checkpoint
                self.say(f"could not append to log.csv: {e}")
        for logger in self.loggers:
            logger.log(row)
        for cb in self.callbacks:
            cb(row)

    def _note_eval(self, val: tuple[float, dict]) -> None:
        """Track the best evaluation (its weights when they are kept) and early stopping."""
        if self.best is None or val[0] < self.best[0]:
            weights = self._trainable_state() if self.keep_best else None
            self.best, self.worse = (val[0], self.step, val[1], weights), 0
        else:
            self.worse += 1
        if self.cfg.patience and self.worse >= self.cfg.patience:
            self.stop.set(f"early stop: val loss above its best ({self.best[0]:.4f} at step "
                          f"{self.best[1]}) for {self.worse} evaluations in a row")

    def log(self, lr: float, loss: float, grad_norm: float, figures: dict, interval, at_eval):
        now = time.perf_counter()
        row = {"step": self.step, "tokens": self.tokens, "elapsed_s": round(self.elapsed(), 3),
               "lr": lr, "train_loss": loss, "val_loss": None, "val_bpb": None,
               "tokens_per_s": round(interval[1] / max(now - interval[0], 1e-9), 1),
               "grad_norm": grad_norm, "mfu": None, **self.objective.row_figures(loss),
               **figures, **self.objective.progress()}
        if self.peak_flops:
            row["mfu"] = round(self._mfu(row["tokens_per_s"]), 4)
        val = self.evaluate() if at_eval else None
        if val is not None:
            self.last_val, self.last_val_step = val, self.step
            row.update({"val_loss": val[0], **{f"val_{k}": v for k, v in val[1].items()}})
            self.say(f"step {self.step}: train loss {loss:.4f}, val loss {val[0]:.4f}"
                     + "".join(f", val {k} {v:.4f}" for k, v in val[1].items())
                     + f", {row['tokens_per_s']:,.0f} tok/s")
            self._note_eval(val)
            self._note_target(row)
        self._emit(row)

    def _mfu(self, tokens_per_s: float) -> float:
        """Model FLOPs utilisation; above 1 the peak is wrong (a CPU probe run while the
        machine was busy): probe again, and if the run still beats it, its own rate is the
        least the device can do, so that becomes the peak (cached, and recorded in meta)."""
        achieved = tokens_per_s * self.flops_per_token / self.dist.world
        if achieved <= self.peak_flops:
            return achieved / self.peak_flops
        if self.device.type == "cpu" and not self._remeasured:
            self._remeasured = True
            self.peak = device_peak(self.device, self.bf16, remeasure=True)
            self.say(f"MFU {achieved / self.peak_flops:.2f} > 1 with the cached peak of "
                     f"{self.peak_flops:.3g} FLOP/s; re-measured: {self.peak['flops']:.3g}")
        if achieved > self.peak["flops"]:
            self.peak = {**self.peak, "flops": achieved,
                         "source": self.peak["source"] + "; raised to this run's own rate"}
            if self.device.type == "cpu":
                raise_cpu_peak(torch.bfloat16 if self.bf16 else torch.float32, achieved)
        self.peak_flops = self.peak["flops"]
        self.meta["peak_flops"] = dict(self.peak)
        return achieved / self.peak_flops

    def _note_target(self, row: dict) -> None:
        """Record the first evaluation at or below the target; stop there with stop_at_bpb."""
        bpb = row.get("val_bpb")
        if not self.target or bpb is None:
            return
        if self.target_reached is None and bpb <= self.target:
            self.target_reached = {k: row[k] for k in ("step", "tokens", "elapsed_s", "val_bpb")}
            self.say(f"step {self.step}: val bits/byte {bpb:.4f} reached the target {self.target}")
        if self.cfg.stop_at_bpb and bpb <= self.cfg.stop_at_bpb:
            self.stop.set(self.target_reason)

    # --- the loop ------------------------------------------------------------------------
    @contextlib.contextmanager
    def _signals(self):
        """Ctrl-C and SIGTERM ask for a stop after the current step (main thread only)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        handlers = {signal.SIGINT: ("interrupted (Ctrl-C)", "interrupt"),
                    signal.SIGTERM: ("terminated (SIGTERM)", "sigterm")}
        previous = {s: signal.signal(s, lambda *_, r=r: self.stop.set(*r))
                    for s, r in handlers.items()}
        try:
            yield
        finally:
            for s, h in previous.items():
                signal.signal(s, h)

    def run(self) -> Outcome:
        cfg, obj = self.cfg, self.objective
        self.start_time = time.perf_counter()
        self.last_checkpoint = self.step if self.resumed else -1
        # on a time budget the bar counts seconds of the budget (a large max_iters would give a
        # bogus ETA); otherwise steps of max_iters
        budget_s = 60 * cfg.max_minutes if cfg.max_minutes else 0.0
        bar = tqdm(total=round(budget_s) if budget_s else cfg.max_iters,
                   initial=min(round(self.elapsed()), round(budget_s)) if budget_s else self.step,
                   unit="s" if budget_s else "step", disable=not (cfg.verbose and self.dist.is_main),
                   dynamic_ncols=True, desc=self.folder.final.name)
        self.model.train()
        if cfg.warmup_iters >= cfg.max_iters > self.step:  # not an error, but never what is meant
            self.say(f"note: warmup_iters={cfg.warmup_iters} >= max_iters={cfg.max_iters}: the "
                     f"whole run is warm-up and the learning rate never reaches lr={cfg.lr:g}; "
                     f"set warmup_iters={max(1, cfg.max_iters // 10)} (a tenth of the steps) "
                     "for a schedule")
        if self.dist.is_main and cfg.logger:
            settings = runs.portable({**self.model_cfg.to_dict(), **cfg.to_dict()})
            self.loggers = make_loggers(cfg.logger, self.run_dir, self.folder.final.name, settings)
        ended = False
        with self._signals():
            try:
                if obj.eval_at_start and not self.resumed:
                    self.first_val = self.evaluate()
                    if self.first_val is not None:
                        self._note_eval(self.first_val)
                        self.say(f"before {obj.kind}: val loss {self.first_val[0]:.4f}")
                    self._emit({"step": 0, "tokens": 0, "elapsed_s": 0.0, **obj.progress(),
                                **({"val_loss": self.first_val[0],
                                    **{f"val_{k}": v for k, v in self.first_val[1].items()}}
                                   if self.first_val else {})})
                self._loop(bar, budget_s)
                ended = True
            except (RuntimeError, MemoryError) as e:
                if not memory.is_out_of_memory(e):
                    raise
                raise MemoryError(memory.oom_message(self.model, cfg, self.model_cfg)) from None
            finally:
                if ended:
                    self._end_bar(bar, budget_s)
                bar.close()
            try:
                return self._finish()
            finally:
                for logger in self.loggers:
                    logger.close(self.meta.get("status", "failed"))

    def _end_bar(self, bar, budget_s: float) -> None:
        """A run that used its steps or its time ends the bar full; a stop leaves it where
        the run stopped and says so, without a total, so it neither reads "100% 21/21" nor
        turns red (a notebook bar closed short of its total looks like an error)."""
        if bar.disable:
            return
        if not self.stop.is_set() or self.stop.reason == self.budget_reason:
            bar.total = bar.n = max(bar.n, 1)
        elif bar.total and bar.n < bar.total:
            unit = "s" if budget_s else " steps"
            bar.set_description(f"{self.folder.final.name}: stopped at {bar.n} of {bar.total}"
                                f"{unit}", refresh=False)
            bar.total = None

    def _loop(self, bar, budget_s: float) -> None:
        cfg, obj = self.cfg, self.objective
        interval = (time.perf_counter(), 0)
        last_step_s = last_eval_s = 0.0  # to end a budgeted run before it overruns
        # on a time budget, also evaluate every twentieth of it, so a run whose steps are fast
        # or slow still draws a curve (eval_interval alone gave a 5-minute run two points)
        every_s = budget_s / TIME_EVALS if budget_s else 0.0
        next_eval_s = (math.floor(self.elapsed() / every_s) + 1) * every_s if every_s else 0.0
        while self.step < cfg.max_iters and not self._should_stop():
            lr = self.lr()
            t0 = time.perf_counter()
            done = self.train_step(lr)
            if done is None:
                break
            last_step_s = time.perf_counter() - t0
            loss, grad_norm, figures, tokens = done
            self.step += 1
            self.tokens += tokens
            interval = (interval[0], interval[1] + tokens)
            bar.update(min(round(self.elapsed()), round(budget_s)) - bar.n if budget_s else 1)
            # stop when another step and the final evaluation would not fit in the budget
            out_of_time = bool(budget_s) and self.elapsed() + last_step_s + last_eval_s > budget_s
            if out_of_time:  # the run ends here, on an evaluation
                self.stop.set(self.budget_reason)
            on_time = bool(every_s) and self.elapsed() >= next_eval_s
            if on_time:
                next_eval_s = (math.floor(self.elapsed() / every_s) + 1) * every_s
            at_eval = (self.step % cfg.eval_interval == 0 or self.step == cfg.max_iters
                       or out_of_time or obj.epoch_ended() or on_time)
            stopping = self.stop.is_set()  # the last step is logged: the log ends where the run does
            if self.step % cfg.log_interval == 0 or at_eval or stopping:
                t0 = time.perf_counter()
                self.log(lr, loss, grad_norm, figures, interval, at_eval)
                if at_eval:
                    last_eval_s = time.perf_counter() - t0
                left = (f"{max(0.0, cfg.max_minutes - self.elapsed() / 60):.1f}"
                        if cfg.max_minutes else None)
                bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{self.log_rows[-1]['tokens_per_s']:,.0f}",
                                **({"min_left": left} if left else {}))
                interval = (time.perf_counter(), 0)
            if self.step % cfg.checkpoint_interval == 0 and not self.bad_in_a_row:
                self.checkpoint()

    def _finish(self) -> Outcome:
        self._should_stop()  # every rank agrees on why it stopped
        failed = self.stop.kind == "failed"
        if not failed:
            if self.bad_in_a_row:  # ended on skipped steps: keep the last good checkpoint
                self.say(f"keeping the last good checkpoint; {self.skipped_steps} steps were skipped")
            elif self.last_checkpoint != self.step:
                self.checkpoint()
            failed = self.stop.kind == "failed"
        if not failed and self.dist.is_main:
            self._keep_best()
            failed = self.stop.kind == "failed"
        stopped = self.stop.reason if self.stop.is_set() else ""
        kind = self.stop.kind if stopped else ""
        budget_end = stopped in (self.budget_reason, self.target_reason)
        planned = budget_end or stopped.startswith("early stop")
        if failed:
            status = f"failed at step {self.step}: {stopped}"
        elif not stopped or budget_end:
            status = "finished" + (f": {stopped}" if stopped else "")
        else:
            status = f"stopped at step {self.step}: {stopped}"
        kept_old = failed and self.folder.abandon()
        self.meta.update({"status": status, "skipped_steps": self.skipped_steps,
                          "steps": self.step, "best_step": self.best[1] if self.best else None,
                          "val_loss_best": self.best[0] if self.best else None})
        if self.target:
            self.meta["target_bpb"] = self.target
            self.meta["target_reached"] = self.target_reached
        if self.objective.eval_at_start:
            self.meta["val_loss_before"] = self.first_val[0] if self.first_val else None
        if "epoch" in self.objective.progress():
            self.meta["epochs"] = self.objective.progress()["epoch"]
        if self.dist.is_main and not kept_old:
            try:
                runs.save_configs(self.run_dir, self.model_cfg, self.cfg, self.meta)
                runs.write_log(self.run_dir, self.log_rows, self.columns)
            except OSError as e:
                self.say(f"could not record the status ({status}) in {self.run_dir}: {e}")
        if kept_old:
            self.say(f"the earlier run {self.folder.final.name!r} is kept as it was")
        elif stopped and not planned and not failed:
            saved = runs.list_checkpoints(self.run_dir)
            where = f"{saved[0][1].name}" if saved else "no checkpoint"
            self.say(f"saved {where} in {self.run_dir}; resume with resume=true")
        best = self.best[:3] if self.best else None
        return Outcome(self.folder.final, self.step, self.tokens, self.elapsed(), self.last_val,
                       best, stopped, status, EXIT_CODES.get(kind, 0), self.first_val,
                       self.target_reached, self.last_val_step)

    def _keep_best(self) -> None:
        """Write the best evaluation's weights: as the run's weights (fine-tuning) or, with
        keep_best=true, beside the last ones as ``model-best.safetensors``."""
        if self.best is None or self.best[3] is None:
            return
        last = self._trainable_state()
        params = dict(self.model.named_parameters())
        try:
            with torch.no_grad():
                for n, v in self.best[3].items():
                    params[n].copy_(v)
            name = runs.WEIGHTS if self.objective.final_is_best else runs.BEST_WEIGHTS
            runs.save_weights(self.run_dir, self.objective.export(self.model), filename=name)
            if name == runs.WEIGHTS:
                self.objective.save_beside(self.model, self.run_dir)
        except OSError as e:
            self.fail(str(e))  # "could not write <file>: why"
        finally:
            if not self.objective.final_is_best:
                with torch.no_grad():
                    for n, v in last.items():
                        params[n].copy_(v)
