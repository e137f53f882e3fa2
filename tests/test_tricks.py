"""Speedrun tricks as config options (issue 21), each tested by what it changes: schedule
values, init statistics, shapes, parameter counts, FLOPs, memory, batch sizes per step."""

from __future__ import annotations

import math
import types

import pytest
import torch

from minlm import LM, ModelConfig, TrainConfig
from minlm.config import ConfigError
from minlm.engine import Engine
from minlm.model import RESIDUAL_OUTPUTS
from minlm.modules import registry
from minlm.optim import lr_at

pytestmark = pytest.mark.usefixtures("one_thread")


# --- warm-up-stable-decay schedule -----------------------------------------------------------

def test_wsd_is_flat_then_decays_linearly_over_the_last_fraction():
    cfg = TrainConfig(lr=1.0, warmup_iters=10, max_iters=110, min_lr_ratio=0.1,
                      schedule="wsd", decay_frac=0.2)
    assert lr_at(0, cfg) == pytest.approx(0.1)  # warm-up as before
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == 1.0 and lr_at(50, cfg) == 1.0
    assert lr_at(90, cfg) == 1.0  # progress 0.8: the decay starts here
    assert lr_at(100, cfg) == pytest.approx(0.55)  # halfway through the decay
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(100, cfg.replace(decay_frac=1.0)) == pytest.approx(0.19)  # = linear
    assert lr_at(100, cfg.replace(schedule="linear")) == pytest.approx(0.19)


def test_wsd_follows_a_time_budget():
    """On a time budget the engine's progress is the share of the budget used; the decay
    starts at 1 - decay_frac of the budget even when steps are far from max_iters."""
    cfg = TrainConfig(lr=1.0, warmup_iters=2, max_iters=10**6, max_minutes=1.0,
                      min_lr_ratio=0.0, schedule="wsd", decay_frac=0.2)
    at = lambda seconds: Engine.lr(types.SimpleNamespace(  # noqa: E731
        cfg=cfg, step=100, elapsed=lambda: seconds))
    assert at(30.0) == 1.0
    assert at(48.0) == pytest.approx(1.0)
    assert at(54.0) == pytest.approx(0.5)
    assert at(60.0) == pytest.approx(0.0)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1])
def test_decay_frac_out_of_range_is_refused(value):
    with pytest.raises(ConfigError, match=r"decay_frac=.* must be in \(0, 1\]"):
        TrainConfig(schedule="wsd", decay_frac=value)


# --- zero-initialised residual outputs and head ----------------------------------------------

for _pkg in sorted(registry.EXPERIMENTS_DIR.glob("*/__init__.py")):
    registry.load_experiment(_pkg.parent.name)


def tiny(**kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=16, dim=32, n_layers=2, n_heads=4, n_kv_heads=2)
    return ModelConfig.from_preset("llama-1m", **{**base, **kw})


def _mixer_cfg(name: str, **kw) -> ModelConfig:
    spec = registry.mixers()[name]
    module = spec.cls.__module__
    exp = module.removeprefix("minlm_experiment_").split(".")[0] \
        if module.startswith("minlm_experiment_") else ""
    return tiny(mixer=name, position="rope" if spec.positional else "none", experiment=exp,
                **{**spec.requires, **kw})


ZERO_CASES = ([("mixer", n) for n in registry.mixers()]
              + [("mlp", n) for n in registry.channel_mixers()])


@pytest.mark.parametrize("kind, name", ZERO_CASES, ids=[f"{k}:{n}" for k, n in ZERO_CASES])
def test_zero_init_proj_zeroes_every_residual_output_and_the_untied_head(kind, name):
    """Every block is the identity at init (the stream reaching the final norm is the
    embedding), the residual outputs and the head are exactly zero, nothing else is, and the
    loss is ln(vocab) exactly."""
    if kind == "mixer":
        cfg = _mixer_cfg(name, zero_init_proj=True, tie_embeddings=False)
    else:
        cfg = tiny(mlp=name, zero_init_proj=True, tie_embeddings=False,
                   **registry.channel_mixers()[name].requires)
    torch.manual_seed(0)
    model = LM(cfg).eval()  # eval: the loss without MoE's load-balancing term
    zeroed = [n for n, p in model.named_parameters() if n.endswith(RESIDUAL_OUTPUTS)]
    assert zeroed and "head.weight" not in zeroed
    for n, p in model.named_parameters():
        if n in zeroed or n == "head.weight":
            assert torch.count_nonzero(p) == 0, n
        elif p.dim() >= 2:
            assert p.std() > 0, n
    idx = torch.randint(0, 64, (2, 10))
    seen = {}
    model.norm.register_forward_hook(lambda m, a, out: seen.setdefault("stream", a[0]))
    with torch.no_grad():
        _, loss = model(idx, torch.randint(0, 64, (2, 10)))
    assert torch.equal(seen["stream"], model.embed(idx))
    assert loss.item() == pytest.approx(math.log(64), abs=1e-6)


def test_zero_init_proj_keeps_a_tied_head_and_training_moves_the_zeros():
    torch.manual_seed(0)
    tied = LM(tiny(zero_init_proj=True))
    assert tied.head.weight is tied.embed.weight and tied.head.weight.std() > 0
    assert torch.count_nonzero(tied.blocks[0].mixer.o_proj.weight) == 0
    plain = LM(tiny())
    assert plain.blocks[0].mixer.o_proj.weight.std() > 0  # off by default
    model = LM(tiny(zero_init_proj=True, tie_embeddings=False))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 64, (4, 16))
    for _ in range(3):  # step 1 moves the head; through it, the projections move next
        model(idx[:, :-1], idx[:, 1:])[1].backward()
        opt.step()
        opt.zero_grad()
    for n, p in model.named_parameters():
        if n.endswith(RESIDUAL_OUTPUTS) or n == "head.weight":
            assert torch.count_nonzero(p) > 0, n
