"""Post-training: supervised fine-tuning on chat data (SFT), LoRA adapters, and DPO.

    result = sft("trained_models/llama-1m", data="hh_rlhf_helpful_sft", epochs=1)
    result = dpo(result.run_dir, data="hh_rlhf_helpful_dpo", lora_rank=8)

    python -m minlm sft <run> --data ../shared/data/chat/hh_rlhf_helpful_sft.jsonl epochs=2
    python -m minlm dpo <run> --data ../shared/data/chat/hh_rlhf_helpful_dpo.jsonl beta=0.1

Each call leaves a new run folder beside its parent (same layout as a pretraining run: both
configs, merged weights that ``load_run`` reads, ``log.csv``, a tokenizer copy) whose
``train_config.json`` meta records the parent run, the fine-tuning config and the data. The
conversations are rendered with the template of ``minlm.chatdata``, which ``generate.Chat``
speaks, so the result chats through ``python -m minlm chat <run>``.

SFT trains on the tokens a mode selects (``response``: assistant turns) with short examples
packed into full rows, for some epochs, evaluating the same loss on held-out conversations
and stopping early when it rises; the best weights are kept. DPO (Rafailov et al. 2023)
raises the policy's log-likelihood ratio to a frozen reference on the chosen reply over the
rejected one and logs reward margins and accuracy.

LoRA (Hu et al. 2021) is written here rather than taken from ``peft``: it is twenty lines on
top of ``nn.Linear``, and merging back into the plain ``LM`` keeps run folders library-free.

Dimension letters: B batch, T time, V vocabulary, R LoRA rank.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from minlm import runs
from minlm.chatdata import (
    Example,
    Mode,
    chat_examples,
    pack_examples,
    read_conversations,
    read_preferences,
    render_chat,
    resolve_chat_file,
)
from minlm.config import ConfigError, Device, Precision, _fail, _Serialisable, check_folder_name
from minlm.loss import masked_cross_entropy
from minlm.tracing import LoggingModule

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

    def __post_init__(self) -> None:
        self._check_types()
        check_folder_name("run_name", self.run_name)
        self._require(("epochs", "batch_size", "log_interval"), lambda v: v >= 1,
                      "must be a positive integer")
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


# ---------------------------------------------------------------------------------------
# LoRA
# ---------------------------------------------------------------------------------------


class LoRALinear(LoggingModule):
    """``base(x) + (alpha / R) * x A^T B^T`` with ``base`` frozen; B starts at zero, so the
    wrapped layer first computes exactly what ``base`` does."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base, self.rank, self.scale = base, rank, alpha / rank
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        w = base.weight
        like = {"device": w.device, "dtype": w.dtype}
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features, **like))  # (R, in)
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank, **like))  # (out, R)
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))  # as nn.Linear initialises
        self.drop = nn.Dropout(dropout)
        self.enabled = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.enabled:
            return y
        low = F.linear(self.drop(x), self.lora_a)  # (..., R)
        return y + F.linear(low, self.lora_b) * self.scale  # (..., out)

    @torch.no_grad()
    def merged(self) -> nn.Linear:
        """The base layer with the adapter folded into its weight."""
        self.base.weight += self.scale * (self.lora_b @ self.lora_a)  # (out, R) @ (R, in)
        return self.base


def _lora_candidates(model: nn.Module) -> dict[str, nn.Module]:
    """Linear-like layers inside the blocks, by full name (embeddings and the tied head are
    left alone: merging into a tied head would change the embeddings too)."""
    return {n: m for n, m in model.named_modules()
            if n.startswith("blocks.") and hasattr(m, "weight") and getattr(m, "weight") is not None
            and getattr(m.weight, "dim", lambda: 0)() == 2 and not isinstance(m, LoRALinear)
            and not n.endswith(".base")}


def add_lora(model: nn.Module, rank: int, alpha: float = 16.0,
             targets: str | Sequence[str] = ("q_proj", "k_proj", "v_proj", "o_proj"),
             dropout: float = 0.0) -> list[str]:
    """Freeze ``model`` and wrap its target linear layers (matched by their last name, e.g.
    ``q_proj``; ``"all"`` for every linear layer in the blocks) in ``LoRALinear``. Returns the
    wrapped layers' names. Trainable parameters: ``R * (in + out)`` per wrapped layer."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ConfigError(f"lora_rank={rank!r} is invalid: must be a positive integer")
    names = [t.strip() for t in (targets.split(",") if isinstance(targets, str) else targets)]
    candidates = _lora_candidates(model)
    available = sorted({n.rsplit(".", 1)[-1] for n in candidates})
    chosen = {n: m for n, m in candidates.items()
              if names == ["all"] or n.rsplit(".", 1)[-1] in names}
    unknown = [t for t in names if t != "all" and t not in available]
    if unknown or not chosen:
        raise ConfigError(f"lora_targets={','.join(names)!r} is invalid: "
                          f"{', '.join(unknown) or 'nothing'} matches no linear layer in the "
                          f"blocks; available: {', '.join(available)} (or 'all')")
    not_linear = sorted({type(m).__name__ for m in chosen.values() if type(m) is not nn.Linear})
    if not_linear:
        raise ConfigError(f"lora_targets={','.join(names)!r}: LoRA wraps plain nn.Linear layers, "
                          f"these are {', '.join(not_linear)} (e.g. linear='bitlinear'); "
                          "fine-tune without LoRA (lora_rank=0)")
    for p in model.parameters():
        p.requires_grad_(False)
    for name, module in chosen.items():
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, LoRALinear(module, rank, alpha, dropout))
    return sorted(chosen)


def merge_lora(model: nn.Module) -> int:
    """Fold every adapter into its layer and put the plain ``nn.Linear`` back; the model
    becomes an ordinary ``LM`` (every parameter trainable again). Returns how many merged."""
    wrapped = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name, module in wrapped:
        parent_name, attr = name.rsplit(".", 1)
        setattr(model.get_submodule(parent_name), attr, module.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return len(wrapped)


@contextlib.contextmanager
def lora_disabled(model: nn.Module) -> Iterator[None]:
    """Run the base model underneath the adapters (DPO's reference, at no memory cost)."""
    wrapped = [m for m in model.modules() if isinstance(m, LoRALinear)]
    before = [m.enabled for m in wrapped]
    for m in wrapped:
        m.enabled = False
    try:
        yield
    finally:
        for m, e in zip(wrapped, before):
            m.enabled = e


def count_trainable(model: nn.Module) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if p.requires_grad and id(p) not in seen:
            seen.add(id(p))
            n += p.numel()
    return n


# ---------------------------------------------------------------------------------------
# losses
# ---------------------------------------------------------------------------------------


def collate(examples: Sequence[Example], pad_id: int, device="cpu"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Inputs x, targets y and loss mask m, each (B, T) with T = longest example - 1; rows
    are right-padded with ``pad_id`` under mask 0."""
    T = max(len(e) for e in examples) - 1
    ids = torch.full((len(examples), T + 1), pad_id, dtype=torch.long)  # (B, T+1)
    mask = torch.zeros((len(examples), T + 1), dtype=torch.float32)  # (B, T+1)
    for r, e in enumerate(examples):
        ids[r, :len(e)] = torch.tensor(e.ids)
        mask[r, :len(e)] = torch.tensor(e.mask, dtype=torch.float32)
    x, y, m = ids[:, :-1], ids[:, 1:], mask[:, 1:]  # (B, T) each
    return x.to(device), y.to(device), m.to(device)


def sft_loss(model, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) and the mean cross-entropy over the targets with mask 1; targets with
    mask 0 add nothing to the loss nor to the gradient."""
    logits, _ = model(x)
    return logits, masked_cross_entropy(logits, y, m)


def sequence_logps(model, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target) over each row's masked targets: (B,)."""
    logits, _ = model(x)  # (B, T, V)
    logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, y[..., None]).squeeze(-1)  # (B, T)
    return (logp * m).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor,
             ref_chosen: torch.Tensor, ref_rejected: torch.Tensor, beta: float = 0.1
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The DPO loss ``-log sigmoid(beta * ((pc - rc) - (pr - rr)))`` averaged over pairs, and
    the implicit rewards ``beta * (pc - rc)``, ``beta * (pr - rr)`` (detached), from sequence
    log-probabilities (B,) of the policy and the reference. Equals log 2 when policy and
    reference agree."""
    chosen = beta * (policy_chosen - ref_chosen)  # (B,)
    rejected = beta * (policy_rejected - ref_rejected)  # (B,)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


# ---------------------------------------------------------------------------------------
# the fine-tuning loop (shared by SFT and DPO)
# ---------------------------------------------------------------------------------------


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

    def __str__(self) -> str:
        figures = ""
        if self.val_loss is not None:
            figures = (f"; val loss {self.val_loss_before:.4f} -> {self.val_loss:.4f} "
                       f"(best at step {self.best_step})")
        extra = "".join(f", {k} {v:.3f}" for k, v in self.metrics.items())
        why = f" ({self.stopped})" if self.stopped else ""
        return (f"{self.kind} run {self.run_dir}: {self.step} steps, {self.epochs:.2f} "
                f"epochs{why}{figures}{extra}")


def _split(items: list, fraction: float, max_val: int) -> tuple[list, list]:
    """(train, val): every ~1/fraction-th item is held out (at least one), at most max_val."""
    from minlm.data import _is_val

    if fraction == 0 or len(items) < 2:
        return list(items), []
    val_idx = [k for k in range(len(items)) if _is_val(k, fraction)] or [len(items) - 1]
    val_idx = set(val_idx[:max_val] if max_val else val_idx)
    return ([x for k, x in enumerate(items) if k not in val_idx],
            [x for k, x in enumerate(items) if k in val_idx])


class _Tuner:
    """Load the parent run, set up adapters and the optimizer, run epochs with evaluation and
    early stopping, then save the kept weights (adapters merged) as a new run."""

    kind = ""
    columns: list[str] = []  # log columns beyond runs.LOG_COLUMNS

    def __init__(self, run, cfg: _TuneConfig, stop=None,
                 callbacks: Iterable[Callable[[dict], None]] = ()):
        from minlm.train import StopFlag, resolve_device, use_bf16

        self.cfg, self.callbacks = cfg, list(callbacks)
        self.stop = stop or StopFlag()
        self.say = tqdm.write if cfg.verbose else (lambda *a, **k: None)
        self.device = resolve_device(cfg.device)
        self.parent = runs.load_run(run, device=self.device)
        self.tokenizer, self.model = self.parent.tokenizer, self.parent.model
        self.tokenizer.chat_tokens  # noqa: B018 - a tokenizer without chat tokens fails here
        self.model_cfg = self.parent.model_config
        self.max_len = self.model_cfg.block_size + 1
        self.bf16 = use_bf16(cfg.precision, self.device)
        self.data_path = resolve_chat_file(cfg.data)
        self.data_meta = {"path": str(self.data_path)}
        self.load_data()
        if not self.train_items:
            empty = self.data_meta.get("dropped_empty", 0) >= self.data_meta.get("conversations", 1)
            raise ValueError(f"no training examples left in {self.data_path} ({self.data_meta}); "
                             + ("no conversation has a turn to learn from (in mode='response': "
                                "an assistant reply); check the roles" if empty else
                                "use more data or a lower val_fraction"))
        torch.manual_seed(cfg.seed)
        self.order_gen = torch.Generator().manual_seed(cfg.seed)
        self.params = self.model.num_params()
        self.lora_layers = (add_lora(self.model, cfg.lora_rank, cfg.lora_alpha, cfg.lora_targets,
                                     cfg.lora_dropout) if cfg.lora_rank else [])
        self.reference = self.make_reference()
        self.trainable = count_trainable(self.model)
        self.steps_per_epoch = self.count_steps()
        planned = self.count_all_steps()
        self.planned = min(planned, cfg.max_steps) if cfg.max_steps else planned
        self.run_dir = self._prepare_run_dir()
        self.train_cfg = self._record_train_config()
        from minlm.optim import make_optimizer

        self.optimizer = make_optimizer(self.model, self.train_cfg, self.device)
        self.meta = {"kind": self.kind, "parent": str(self.parent.path.resolve()),
                     "parent_name": self.parent.name, "finetune": cfg.to_dict(),
                     "params": self.params, "trainable_params": self.trainable,
                     "lora": ({"rank": cfg.lora_rank, "alpha": cfg.lora_alpha,
                               "layers": self.lora_layers, "merged": True}
                              if cfg.lora_rank else None),
                     "tokenizer_hash": self.tokenizer.hash, "data_meta": self.data_meta,
                     "device": str(self.device), "bf16": self.bf16,
                     "hardware": runs.hardware(self.device),
                     "versions": runs.library_versions(), "status": "training"}
        self.meta["tokenizer_path"] = str(runs.copy_tokenizer(self.run_dir, self.tokenizer))
        runs.save_configs(self.run_dir, self.model_cfg, self.train_cfg, self.meta)
        self.rows: list[dict] = []
        runs.write_log(self.run_dir, self.rows, runs.LOG_COLUMNS + self.columns)
        self.say(f"{self.kind}: {len(self.train_items):,} train / {len(self.val_items):,} val "
                 f"examples, {self.planned} steps, {self.trainable:,} trainable parameters"
                 + (f" (LoRA rank {cfg.lora_rank} on {len(self.lora_layers)} layers)"
                    if cfg.lora_rank else ""))

    # --- what SFT and DPO provide ----------------------------------------------------------
    def load_data(self) -> None:
        raise NotImplementedError

    def count_steps(self) -> int:
        raise NotImplementedError

    def count_all_steps(self) -> int:
        """Optimizer steps over every epoch: what the schedule and the progress bar plan for."""
        return self.steps_per_epoch * self.cfg.epochs

    def batches(self, epoch: int) -> list:
        """The epoch's batches, in order (epoch 0: unshuffled, for counting)."""
        raise NotImplementedError

    def step_loss(self, batch) -> tuple[torch.Tensor, dict, int]:
        """(loss, figures to log, tokens processed) of one batch."""
        raise NotImplementedError

    def evaluate(self) -> tuple[float, dict]:
        raise NotImplementedError

    def make_reference(self):
        return None

    # --- setup helpers -------------------------------------------------------------------
    def _prepare_run_dir(self) -> Path:
        cfg = self.cfg
        out = Path(cfg.out_dir) if cfg.out_dir else self.parent.path.parent
        run_dir = out / (cfg.run_name or f"{self.parent.name}-{self.kind}")
        if run_dir.resolve() == self.parent.path.resolve():
            raise runs.RunError(f"run_name={run_dir.name!r} is the parent run itself; choose "
                                "another run_name")
        if runs.check_run_target(run_dir, overwrite=cfg.overwrite, resumable=False):
            import shutil

            shutil.rmtree(run_dir)
        run_dir.mkdir(parents=True, exist_ok=True)
        return run_dir

    def _record_train_config(self):
        """The parent's TrainConfig with this run's settings: what train_config.json holds, so
        the folder reads like any run (the full fine-tuning config is in meta.finetune)."""
        cfg = self.cfg
        return self.parent.train_config.replace(
            run_name=self.run_dir.name, out_dir=str(self.run_dir.parent),
            data=str(self.data_path), tokenizer="", max_iters=max(1, self.planned),
            max_minutes=0.0, batch_size=cfg.batch_size,
            grad_accum_steps=1, lr=cfg.lr, min_lr_ratio=cfg.min_lr_ratio,
            warmup_iters=cfg.warmup_iters, schedule="cosine", optimizer="adamw",
            weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
            eval_interval=cfg.eval_interval or max(1, self.steps_per_epoch),
            log_interval=cfg.log_interval, seed=cfg.seed, device=cfg.device,
            precision=cfg.precision, compile=False, fsdp=False, resume=False,
            overwrite=cfg.overwrite, max_docs=cfg.max_examples, val_fraction=cfg.val_fraction,
            verbose=cfg.verbose)

    # --- the loop ------------------------------------------------------------------------
    def _trainable_state(self) -> dict[str, torch.Tensor]:
        return {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def _autocast(self):
        if self.bf16:
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    @torch.no_grad()
    def _evaluate(self) -> tuple[float, dict] | None:
        if not self.val_items:
            return None
        was = self.model.training
        self.model.eval()
        try:
            with self._autocast():
                return self.evaluate()
        finally:
            self.model.train(was)

    def _log(self, row: dict) -> None:
        self.rows.append(row)
        for cb in self.callbacks:
            cb(row)

    def run(self) -> FinetuneResult:
        cfg = self.cfg
        self.start = time.perf_counter()
        previous_handler = None
        if threading.current_thread() is threading.main_thread():
            previous_handler = signal.signal(signal.SIGINT,
                                             lambda *_: self.stop.set("interrupted (Ctrl-C)"))
        before = self._evaluate()
        # best evaluation so far: (val loss, step, trainable weights, other figures)
        self.best = (before[0], 0, self._trainable_state(), before[1]) if before else None
        self.worse = 0  # evaluations in a row above the best
        self._log({"step": 0, "tokens": 0, "elapsed_s": 0.0, "epoch": 0.0,
                   "val_loss": before[0] if before else None,
                   **{f"val_{k}": v for k, v in (before[1] if before else {}).items()}})
        if before:
            self.say(f"before {self.kind}: val loss {before[0]:.4f}")
        self.step = self.tokens = 0
        epochs_done, self.interval = 0.0, (time.perf_counter(), 0)
        bar = tqdm(total=self.planned, unit="step", desc=self.run_dir.name, dynamic_ncols=True,
                   disable=not cfg.verbose)
        self.model.train()
        try:
            for epoch in range(1, cfg.epochs + 1):
                batches = self.batches(epoch)
                for k, batch in enumerate(batches, 1):
                    if self._done():
                        break
                    loss, grad_norm, lr, figures = self._train_step(batch)
                    epochs_done = epoch - 1 + k / len(batches)
                    bar.update(1)
                    at_eval = (k == len(batches) or self._done()
                               or bool(cfg.eval_interval) and self.step % cfg.eval_interval == 0)
                    if self.step % cfg.log_interval == 0 or at_eval:
                        self._log_step(loss, grad_norm, lr, figures, epochs_done, at_eval)
                        bar.set_postfix(loss=f"{loss:.3f}")
                if self._done():
                    break
        except (RuntimeError, MemoryError) as e:
            if not runs.is_out_of_memory(e):
                raise
            raise MemoryError(f"out of memory fine-tuning at batch_size={cfg.batch_size}; try "
                              f"batch_size={max(1, cfg.batch_size // 2)}") from None
        finally:
            bar.close()
            if previous_handler is not None:
                signal.signal(signal.SIGINT, previous_handler)
        return self._finish(self.step, epochs_done, before, self.best)

    def _done(self) -> bool:
        return self.stop.is_set() or bool(self.cfg.max_steps) and self.step >= self.cfg.max_steps

    def _train_step(self, batch) -> tuple[float, float, float, dict]:
        """One optimizer step; returns (loss, grad norm, lr, figures); a non-finite loss or
        gradient skips the update."""
        from minlm.optim import set_lr
        from minlm.train import lr_at

        cfg = self.cfg
        lr = lr_at(self.step, self.train_cfg)
        set_lr(self.optimizer, lr, cfg.lr)
        with self._autocast():
            loss, figures, n_tokens = self.step_loss(batch)
        loss.backward()
        params = [p for p in self.model.parameters() if p.requires_grad]
        clip = cfg.grad_clip if cfg.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item()
        loss_value = loss.item()
        if math.isfinite(loss_value) and math.isfinite(grad_norm):
            self.optimizer.step()
        else:
            self.say(f"step {self.step + 1}: non-finite loss or gradient; update skipped")
        self.optimizer.zero_grad(set_to_none=True)
        self.step, self.tokens = self.step + 1, self.tokens + n_tokens
        self.interval = (self.interval[0], self.interval[1] + n_tokens)
        return loss_value, grad_norm, lr, figures

    def _log_step(self, loss: float, grad_norm: float, lr: float, figures: dict,
                  epochs_done: float, at_eval: bool) -> None:
        """A log row; at an evaluation also the val figures, the best weights and early stop."""
        cfg, now = self.cfg, time.perf_counter()
        row = {"step": self.step, "tokens": self.tokens, "lr": lr, "train_loss": loss,
               "grad_norm": grad_norm, "epoch": round(epochs_done, 4),
               "elapsed_s": round(now - self.start, 3),
               "tokens_per_s": round(self.interval[1] / max(now - self.interval[0], 1e-9), 1),
               **figures}
        self.interval = (now, 0)
        val = self._evaluate() if at_eval else None
        if val is not None:
            row.update({"val_loss": val[0], **{f"val_{k}": v for k, v in val[1].items()}})
            if self.best is None or val[0] < self.best[0]:
                self.best, self.worse = (val[0], self.step, self._trainable_state(), val[1]), 0
            else:
                self.worse += 1
            self.say(f"step {self.step}: train loss {loss:.4f}, val loss {val[0]:.4f}"
                     + "".join(f", {k} {v:.3f}" for k, v in val[1].items()))
            if cfg.patience and self.worse >= cfg.patience:
                self.stop.set(f"early stop: val loss above its best ({self.best[0]:.4f} at step "
                              f"{self.best[1]}) for {self.worse} evaluations in a row")
        self._log(row)
        runs.write_log(self.run_dir, self.rows, runs.LOG_COLUMNS + self.columns)

    def _finish(self, step, epochs_done, before, best) -> FinetuneResult:
        if best is not None:  # keep the best evaluated weights
            params = dict(self.model.named_parameters())
            with torch.no_grad():
                for n, v in best[2].items():
                    params[n].copy_(v)
        if self.lora_layers:
            merge_lora(self.model)
        runs.save_weights(self.run_dir, self.model)
        stopped = self.stop.reason if self.stop.is_set() else ""
        status = f"stopped at step {step}: {stopped}" if stopped else "finished"
        self.meta.update({"status": status, "steps": step, "epochs": round(epochs_done, 4),
                          "val_loss_before": before[0] if before else None,
                          "best_step": best[1] if best else step,
                          "val_loss_best": best[0] if best else None})
        runs.save_configs(self.run_dir, self.model_cfg, self.train_cfg, self.meta)
        runs.write_log(self.run_dir, self.rows, runs.LOG_COLUMNS + self.columns)
        self.model.eval()
        result = FinetuneResult(self.run_dir, self.kind, step, epochs_done,
                                before[0] if before else None, best[0] if best else None,
                                best[1] if best else step, stopped, best[3] if best else {})
        self.say(str(result))
        return result


# --- SFT -------------------------------------------------------------------------------------

class _SFT(_Tuner):
    kind = "sft"
    columns = ["epoch", "trained_tokens"]

    def load_data(self) -> None:
        cfg = self.cfg
        data = read_conversations(self.data_path, skip_invalid=cfg.skip_invalid,
                                  limit=cfg.max_examples)
        train_convs, val_convs = _split(data.examples, cfg.val_fraction, cfg.max_val)
        self.train_items, stats = chat_examples(self.tokenizer, train_convs, cfg.mode,
                                                self.max_len, cfg.cut, cfg.skip_invalid)
        self.val_items, val_stats = chat_examples(self.tokenizer, val_convs, cfg.mode,
                                                  self.max_len, cfg.cut, cfg.skip_invalid)
        self.data_meta.update({
            "conversations": len(data), "skipped_malformed": data.skipped,
            "train_examples": stats.examples, "val_examples": val_stats.examples,
            "truncated": stats.truncated + val_stats.truncated,
            "dropped_empty": stats.dropped + val_stats.dropped,
            "invalid": stats.invalid + val_stats.invalid, "mode": cfg.mode})
        if data.skipped:
            self.say(f"skipped {data.skipped} malformed examples of {self.data_path}; first: "
                     f"{data.problems[0]}")

    def _rows(self, epoch: int) -> list[Example]:
        order = self._orders[epoch - 1] if epoch else range(len(self.train_items))
        items = [self.train_items[i] for i in order]
        if self.cfg.pack:
            return pack_examples(items, self.max_len, self.tokenizer.pad_id)
        return items

    def count_steps(self) -> int:
        return math.ceil(len(self._rows(0)) / self.cfg.batch_size)

    def count_all_steps(self) -> int:
        # packing fills rows differently in each shuffled order, so every epoch's order is drawn
        # now (the same draws, in the same sequence, as drawing each at its epoch) and counted
        n, B = len(self.train_items), self.cfg.batch_size
        self._orders = [torch.randperm(n, generator=self.order_gen).tolist()
                        for _ in range(self.cfg.epochs)]
        return sum(math.ceil(len(self._rows(e)) / B) for e in range(1, self.cfg.epochs + 1))

    def batches(self, epoch: int) -> list:
        rows, B = self._rows(epoch), self.cfg.batch_size
        return [collate(rows[i:i + B], self.tokenizer.pad_id, self.device)
                for i in range(0, len(rows), B)]

    def step_loss(self, batch):
        x, y, m = batch
        _, loss = sft_loss(self.model, x, y, m)
        n_tokens = int((x != self.tokenizer.pad_id).sum())
        return loss, {"trained_tokens": int(m.sum())}, n_tokens

    def evaluate(self) -> tuple[float, dict]:
        return masked_loss(self.model, self.val_items, self.cfg.batch_size, self.tokenizer.pad_id,
                           self.device), {}


@torch.no_grad()
def masked_loss(model, examples: Sequence[Example], batch_size: int = 8, pad_id: int = 0,
                device="cpu") -> float:
    """Mean cross-entropy per trained token over ``examples`` (each padded, not packed)."""
    total = count = 0.0
    for i in range(0, len(examples), batch_size):
        x, y, m = collate(examples[i:i + batch_size], pad_id, device)
        logits, _ = model(x)
        losses = F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), reduction="none")
        total += float((losses * m.flatten()).sum())
        count += float(m.sum())
    return total / max(count, 1.0)


# --- DPO -------------------------------------------------------------------------------------

def preference_examples(tokenizer, pair: dict, max_len: int) -> tuple[Example, Example]:
    """The chosen and rejected replies after the rendered prompt, as two examples whose mask
    covers the reply and its ``<|end|>``; too long: the reply is cut to at most half the
    context if the prompt needs the rest, and the prompt loses its oldest tokens (after BOS)."""
    end = tokenizer.chat_tokens["end"]
    prompt = render_chat(tokenizer, pair["prompt"], add_generation_prompt=True)
    out = []
    for key in ("chosen", "rejected"):
        reply = tokenizer.encode(pair[key]) + [end]
        reply = reply[:max(max_len - len(prompt), max_len // 2)]
        head = prompt if len(prompt) + len(reply) <= max_len else \
            [prompt[0]] + prompt[len(prompt) - (max_len - len(reply) - 1):]
        out.append(Example(head + reply, [0] * len(head) + [1] * len(reply), tokenizer))
    return out[0], out[1]


class _DPO(_Tuner):
    kind = "dpo"
    columns = ["epoch", "reward_margin", "reward_accuracy", "val_reward_margin",
               "val_reward_accuracy"]

    def load_data(self) -> None:
        cfg = self.cfg
        data = read_preferences(self.data_path, skip_invalid=cfg.skip_invalid,
                                limit=cfg.max_examples)
        pairs = [preference_examples(self.tokenizer, p, self.max_len) for p in data.examples]
        self.train_items, self.val_items = _split(pairs, cfg.val_fraction, cfg.max_val)
        self.data_meta.update({"pairs": len(data), "skipped_malformed": data.skipped,
                               "train_pairs": len(self.train_items),
                               "val_pairs": len(self.val_items)})
        if data.skipped:
            self.say(f"skipped {data.skipped} malformed pairs of {self.data_path}; first: "
                     f"{data.problems[0]}")

    def make_reference(self):
        if self.lora_layers:
            return None  # the base model under the adapters is the reference
        ref = copy.deepcopy(self.model).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        return ref

    @torch.no_grad()
    def _reference_logps(self, x, y, m) -> torch.Tensor:
        if self.reference is not None:
            return sequence_logps(self.reference, x, y, m)
        was = self.model.training
        self.model.eval()
        try:
            with lora_disabled(self.model):
                return sequence_logps(self.model, x, y, m)
        finally:
            self.model.train(was)

    def count_steps(self) -> int:
        return math.ceil(len(self.train_items) / self.cfg.batch_size)

    def _batch(self, pairs):
        return collate([c for c, _ in pairs] + [r for _, r in pairs], self.tokenizer.pad_id,
                       self.device)  # (2B, T): chosen rows, then rejected rows

    def batches(self, epoch: int) -> list:
        order = torch.randperm(len(self.train_items), generator=self.order_gen).tolist()
        B = self.cfg.batch_size
        return [self._batch([self.train_items[j] for j in order[i:i + B]])
                for i in range(0, len(order), B)]

    def _pair_loss(self, batch):
        x, y, m = batch
        n = x.shape[0] // 2
        policy = sequence_logps(self.model, x, y, m)  # (2B,)
        ref = self._reference_logps(x, y, m)  # (2B,)
        loss, chosen, rejected = dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.cfg.beta)
        return loss, chosen, rejected

    def step_loss(self, batch):
        loss, chosen, rejected = self._pair_loss(batch)
        margin = chosen - rejected
        figures = {"reward_margin": float(margin.mean()),
                   "reward_accuracy": float((margin > 0).float().mean())}
        return loss, figures, int((batch[0] != self.tokenizer.pad_id).sum())

    def evaluate(self) -> tuple[float, dict]:
        B, total, margins = self.cfg.batch_size, 0.0, []
        for i in range(0, len(self.val_items), B):
            pairs = self.val_items[i:i + B]
            loss, chosen, rejected = self._pair_loss(self._batch(pairs))
            total += float(loss) * len(pairs)
            margins.append(chosen - rejected)
        margin = torch.cat(margins)
        return total / len(self.val_items), {"reward_margin": float(margin.mean()),
                                             "reward_accuracy": float((margin > 0).float().mean())}


# ---------------------------------------------------------------------------------------
# entry points
# ---------------------------------------------------------------------------------------

def _config(cls, config, data, overrides):
    cfg = config or cls()
    if data is not None:
        overrides = {**overrides, "data": str(data)}
    return cfg.replace(**overrides) if overrides else cfg


def sft(run, data: str | Path | None = None, config: SFTConfig | None = None, stop=None,
        callbacks: Iterable[Callable[[dict], None]] = (), **overrides) -> FinetuneResult:
    """Fine-tune run ``run`` (a name or folder) on the conversations in ``data``; any
    ``SFTConfig`` field can be given as a keyword. Returns the new run's figures."""
    return _SFT(run, _config(SFTConfig, config, data, overrides), stop, callbacks).run()


def dpo(run, data: str | Path | None = None, config: DPOConfig | None = None, stop=None,
        callbacks: Iterable[Callable[[dict], None]] = (), **overrides) -> FinetuneResult:
    """Preference-tune run ``run`` with DPO on ``{"prompt", "chosen", "rejected"}`` pairs
    against a frozen copy of itself; any ``DPOConfig`` field can be given as a keyword."""
    return _DPO(run, _config(DPOConfig, config, data, overrides), stop, callbacks).run()
