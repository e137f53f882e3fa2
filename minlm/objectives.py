"""What is trained: the objectives the engine (``minlm.engine``) runs.

An objective hands out batches (and can say where it stands, for exact resume), computes a
batch's loss, and evaluates on held-out data. Everything else (the loop, checkpoints,
budgets, the log, signals) is the engine's. To add one (distillation, say), subclass
``engine.Objective`` and implement ``next_batch``, ``loss``, ``evaluate``, ``state_dict``
and ``load_state_dict``; ``columns`` names its extra log figures.

- ``Pretraining``: next-token cross-entropy on random windows of the token shards.
- ``SFT``: cross-entropy on the tokens a loss mask selects (assistant turns), by epochs.
- ``DPO`` (Rafailov et al. 2023): raise the policy's log-likelihood ratio to a frozen
  reference on the chosen reply over the rejected one, by epochs.

Dimension letters: B batch, T time, V vocabulary.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from minlm.chatdata import Example, pack_examples, render_chat
from minlm.data import _is_val, get_batch
from minlm.engine import Objective, StepOut
from minlm.errors import ConfigError
from minlm.evaluate import bits_per_byte, estimate_loss
from minlm.lora import LoRALinear, lora_disabled, merge_lora
from minlm.loss import masked_cross_entropy
from minlm.modules.registry import _check_new
from minlm.optim import batch_size_at

# --- the registry of pretraining objectives ---------------------------------------------


@dataclass(frozen=True)
class ObjectiveSpec:
    """What every path needs of an objective ``objective=name``: ``cls`` is built like
    ``Pretraining`` (model, shards, cfg, model_cfg, generator, device, shard); ``sampler``
    (optional) is what ``generate`` uses for runs trained with it; ``evaluate`` (optional)
    what ``eval`` reports; ``bpb_is_bound``: its bits per byte is an upper bound, recorded
    as plain data in the run folder so ``compare`` and the model card label it without
    importing any code."""

    name: str
    cls: type
    sampler: Callable | None = None
    evaluate: Callable | None = None
    bpb_is_bound: bool = False


_OBJECTIVES: dict[str, ObjectiveSpec] = {}


def register_objective(name: str, **spec) -> ObjectiveSpec:
    """Register the pretraining objective ``objective=name`` (fields of ``ObjectiveSpec``);
    the same class from the same file again replaces it, by the mixers' rule (``_check_new``)."""
    _check_new(name, _OBJECTIVES, spec["cls"])
    _OBJECTIVES[name] = ObjectiveSpec(name, **spec)
    return _OBJECTIVES[name]


def objective_spec(name: str) -> ObjectiveSpec:
    """The registration of ``name``, or a ConfigError listing what is registered."""
    if name not in _OBJECTIVES:
        raise ConfigError(f"objective={name!r} is not a registered objective; registered: "
                          f"{', '.join(sorted(_OBJECTIVES))} (an experiment registers more: "
                          "experiment=<name or path>)")
    return _OBJECTIVES[name]


# --- pretraining ----------------------------------------------------------------------------


class Pretraining(Objective):
    """Next-token loss on random windows; the batch generator's state is the data position."""

    kind = "pretrain"

    def __init__(self, model, shards, cfg, model_cfg, generator: torch.Generator, device,
                 shard: tuple[int, int] = (0, 1)):
        self.model, self.shards, self.cfg, self.model_cfg = model, shards, cfg, model_cfg
        self.gen, self.device, self.shard = generator, device, shard
        self.batch_size = cfg.batch_size  # global; smaller during a batch-size warm-up

    def begin_step(self, step: int) -> None:
        self.batch_size = batch_size_at(step, self.cfg, self.shard[1])

    def next_batch(self):
        return get_batch(self.shards.train, self.batch_size, self.model_cfg.block_size,
                         self.gen, self.device, self.shard)

    def loss(self, fwd, batch) -> StepOut:
        x, y = batch
        _, loss = fwd(x, y, return_logits=False)  # fused head + loss
        aux = float(self.model.aux_loss)  # MoE load balance; 0 without experts
        # log the cross-entropy alone, so runs with and without experts compare
        value = loss.item() - self.model_cfg.aux_loss_weight * aux
        return StepOut(loss, value, self.batch_size * self.model_cfg.block_size,
                       {"aux_loss": aux})

    def evaluate(self):
        cfg = self.cfg
        if not cfg.eval_iters:
            return None
        val = estimate_loss(self.model, self.shards.val, self.model_cfg.block_size,
                            cfg.eval_batch_size or cfg.batch_size, cfg.eval_iters, self.device)
        return val, {"bpb": bits_per_byte(val, 1, self.shards.bytes_per_token("val"))}

    def row_figures(self, train_loss: float) -> dict:
        return {"train_bpb": bits_per_byte(train_loss, 1, self.shards.bytes_per_token("train"))}

    def state_dict(self) -> dict:
        return {"batch_rng": self.gen.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.gen.set_state(state["batch_rng"])


register_objective("pretrain", cls=Pretraining)


def epochs_to_steps(epochs: float, train_tokens: int, tokens_per_step: int,
                    first_steps: Sequence[int] = ()) -> int:
    """Optimizer steps that read ``epochs`` passes over ``train_tokens`` (at least one);
    ``first_steps``: the tokens of the first steps where they read fewer (a batch warm-up)."""
    need = epochs * train_tokens
    for k, tokens in enumerate(first_steps):
        if need <= 0:
            return max(1, k)
        need -= tokens
    return max(1, len(first_steps) + max(0, math.ceil(need / tokens_per_step)))


def pretraining_step_tokens(cfg, block_size: int, world: int = 1) -> list[int]:
    """Tokens of each batch-warm-up step (global, all micro-batches), the steps before the
    full ``batch_size`` ones."""
    return [batch_size_at(s, cfg, world) * block_size * cfg.grad_accum_steps
            for s in range(cfg.batch_warmup_iters)]


# --- batches of examples (SFT, DPO) ---------------------------------------------------------


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


def split_items(items: list, fraction: float, max_val: int) -> tuple[list, list]:
    """(train, val): every ~1/fraction-th item is held out (at least one), at most max_val."""
    if fraction == 0 or len(items) < 2:
        return list(items), []
    val_idx = [k for k in range(len(items)) if _is_val(k, fraction)] or [len(items) - 1]
    val_idx = set(val_idx[:max_val] if max_val else val_idx)
    return ([x for k, x in enumerate(items) if k not in val_idx],
            [x for k, x in enumerate(items) if k in val_idx])


class _Epochs(Objective):
    """Shuffled passes over a list of items; the position is (epoch, batch within it).

    Every epoch's order is drawn up front from one seeded generator, so the step count is
    known before training and a resumed run rebuilds the same orders from the seed."""

    eval_at_start = True
    final_is_best = True

    def __init__(self, train_items: list, val_items: list, epochs: int, batch_size: int,
                 seed: int, pad_id: int, device):
        self.train_items, self.val_items = train_items, val_items
        self.epochs, self.batch_size, self.pad_id, self.device = epochs, batch_size, pad_id, device
        gen = torch.Generator().manual_seed(seed)
        self.orders = [torch.randperm(len(train_items), generator=gen).tolist()
                       for _ in range(epochs)]
        self.epoch, self.k, self._batches = 0, 0, []  # k: batches taken from this epoch

    def epoch_batches(self, order: list[int]) -> list:
        raise NotImplementedError

    def steps_per_epoch(self) -> list[int]:
        return [len(self.epoch_batches(order)) for order in self.orders]

    def _enter(self, epoch: int) -> None:
        self.epoch, self.k = epoch, 0
        self._batches = self.epoch_batches(self.orders[epoch - 1]) if epoch else []

    def next_batch(self):
        while self.k >= len(self._batches):
            if self.epoch >= self.epochs:
                return None
            self._enter(self.epoch + 1)
        self.k += 1
        return self._batches[self.k - 1]

    def epoch_ended(self) -> bool:
        return self.k == len(self._batches)

    def progress(self) -> dict:
        done = self.epoch - 1 + self.k / len(self._batches) if self._batches else 0.0
        return {"epoch": round(max(done, 0.0), 4)}

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self._enter(state["epoch"])
        self.k = state["k"]

    def export(self, model):
        """With LoRA adapters, a copy with them merged: a plain ``LM`` for the run folder."""
        if not any(isinstance(m, LoRALinear) for m in model.modules()):
            return model
        merged = copy.deepcopy(model)
        merge_lora(merged)
        return merged

    adapter_base: str | None = None  # set (to the parent run's name): also save the adapter

    def save_beside(self, model, run_dir: Path) -> None:
        """With LoRA, the adapters in PEFT's format too (``minlm.adapters``), which peft loads
        on top of the parent's transformers export."""
        if self.adapter_base is not None:
            from minlm.adapters import ADAPTER_DIR, save_adapter

            save_adapter(model, run_dir / ADAPTER_DIR, base=self.adapter_base)


# --- SFT ------------------------------------------------------------------------------------


def sft_loss(model, x: torch.Tensor, y: torch.Tensor, m: torch.Tensor
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, T, V) and the mean cross-entropy over the targets with mask 1; targets with
    mask 0 add nothing to the loss nor to the gradient."""
    logits, _ = model(x)
    return logits, masked_cross_entropy(logits, y, m)


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


class SFT(_Epochs):
    """Masked cross-entropy on chat examples, packed into full rows when ``pack``."""

    kind = "sft"
    columns = ["epoch", "trained_tokens"]

    def __init__(self, model, train_items, val_items, epochs, batch_size, seed, pad_id, device,
                 max_len: int, pack: bool):
        self.model, self.max_len, self.pack = model, max_len, pack
        super().__init__(train_items, val_items, epochs, batch_size, seed, pad_id, device)

    def epoch_batches(self, order):
        items = [self.train_items[i] for i in order]
        rows = pack_examples(items, self.max_len, self.pad_id) if self.pack else items
        B = self.batch_size
        return [collate(rows[i:i + B], self.pad_id, self.device) for i in range(0, len(rows), B)]

    def loss(self, fwd, batch) -> StepOut:
        x, y, m = batch
        _, loss = sft_loss(fwd, x, y, m)
        return StepOut(loss, loss.item(), int((x != self.pad_id).sum()),
                       {"trained_tokens": int(m.sum())})

    def evaluate(self):
        if not self.val_items:
            return None
        return masked_loss(self.model, self.val_items, self.batch_size, self.pad_id,
                           self.device), {}


# --- DPO ------------------------------------------------------------------------------------


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


class DPO(_Epochs):
    """Preference pairs against a frozen reference: a copy of the starting model, or with
    LoRA the base model under the adapters (no second copy in memory)."""

    kind = "dpo"
    columns = ["epoch", "reward_margin", "reward_accuracy", "val_reward_margin",
               "val_reward_accuracy"]

    def __init__(self, model, train_items, val_items, epochs, batch_size, seed, pad_id, device,
                 beta: float, lora: bool):
        self.model, self.beta = model, beta
        self.reference = None
        if not lora:
            self.reference = copy.deepcopy(model).eval()
            for p in self.reference.parameters():
                p.requires_grad_(False)
        super().__init__(train_items, val_items, epochs, batch_size, seed, pad_id, device)

    def _batch(self, pairs):
        return collate([c for c, _ in pairs] + [r for _, r in pairs], self.pad_id,
                       self.device)  # (2B, T): chosen rows, then rejected rows

    def epoch_batches(self, order):
        B = self.batch_size
        return [self._batch([self.train_items[j] for j in order[i:i + B]])
                for i in range(0, len(order), B)]

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

    def _pair_loss(self, fwd, batch):
        x, y, m = batch
        n = x.shape[0] // 2
        policy = sequence_logps(fwd, x, y, m)  # (2B,)
        ref = self._reference_logps(x, y, m)  # (2B,)
        return dpo_loss(policy[:n], policy[n:], ref[:n], ref[n:], self.beta)

    def loss(self, fwd, batch) -> StepOut:
        loss, chosen, rejected = self._pair_loss(fwd, batch)
        margin = chosen - rejected
        figures = {"reward_margin": float(margin.mean()),
                   "reward_accuracy": float((margin > 0).float().mean())}
        return StepOut(loss, loss.item(), int((batch[0] != self.pad_id).sum()), figures)

    def evaluate(self):
        if not self.val_items:
            return None
        B, total, margins = self.batch_size, 0.0, []
        for i in range(0, len(self.val_items), B):
            pairs = self.val_items[i:i + B]
            loss, chosen, rejected = self._pair_loss(self.model, self._batch(pairs))
            total += float(loss) * len(pairs)
            margins.append(chosen - rejected)
        margin = torch.cat(margins)
        return total / len(self.val_items), {"reward_margin": float(margin.mean()),
                                             "reward_accuracy": float((margin > 0).float().mean())}
