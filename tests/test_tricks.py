"""Speedrun tricks as config options (issue 21), each tested by what it changes: schedule
values, init statistics, shapes, parameter counts, FLOPs, memory, batch sizes per step."""

from __future__ import annotations

import json
import math
import types

import pandas as pd
import pytest
import torch

from minlm import LM, ModelConfig, TrainConfig
from minlm.config import ConfigError
from minlm.engine import Engine
from minlm.flops import flops_per_token
from minlm.memory import estimate_training_bytes
from minlm.model import RESIDUAL_OUTPUTS
from minlm.modules import registry
from minlm.modules.value_embed import value_table
from minlm.objectives import epochs_to_steps
from minlm.optim import batch_size_at, lr_at

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


# --- value embeddings and U-net skips --------------------------------------------------------

def test_value_embedding_tables_serve_the_first_and_last_layers():
    cfg = tiny(n_layers=5, value_embeds=2)
    assert [value_table(cfg, i) for i in range(5)] == [0, 1, None, 0, 1]
    torch.manual_seed(0)
    model = LM(cfg)
    K_D = cfg.kv_heads * cfg.head_size
    assert [t.weight.shape for t in model.value_embeds.tables] == [(64, K_D)] * 2
    mixes = [b.mixer.value_mix for b in model.blocks]
    assert [m is not None for m in mixes] == [True, True, False, True, True]
    assert all(torch.equal(m.weight, torch.full((2,), 0.5)) for m in mixes if m is not None)
    base = LM(tiny(n_layers=5))
    assert model.num_params() == base.num_params() + 2 * 64 * K_D + 4 * 2  # tables + mixes
    assert model.num_params(non_embedding=True) == base.num_params(non_embedding=True) + 4 * 2


def test_value_embeddings_enter_the_values_with_the_learned_mix():
    """v = a v + b table[token]. With (a, b) = (1, 0) the model is the plain one; with
    (1, 1) and every table row the vector c, attention (whose weights sum to one) adds
    o_proj(c) to layer 0's output, each query head reading its key/value head's part."""
    torch.manual_seed(0)
    model = LM(tiny(n_layers=3, value_embeds=1)).eval()
    plain = LM(tiny(n_layers=3)).eval()
    plain.load_state_dict(model.state_dict(), strict=False)
    assert model.blocks[1].mixer.value_mix is None
    idx = torch.randint(0, 64, (2, 6))
    outs = {}
    for name, m in (("ve", model), ("plain", plain)):
        m.blocks[0].mixer.register_forward_hook(
            lambda mod, a, out, name=name: outs.__setitem__(name, out))
    with torch.no_grad():
        for i in (0, 2):
            model.blocks[i].mixer.value_mix.weight.copy_(torch.tensor([1.0, 0.0]))
        assert torch.allclose(model(idx)[0], plain(idx)[0], atol=1e-6)
        c = torch.randn(2 * 8)  # K=2 heads of D=8
        model.value_embeds.tables[0].weight.copy_(c.expand(64, -1))
        model.blocks[0].mixer.value_mix.weight.copy_(torch.tensor([1.0, 1.0]))
        model(idx), plain(idx)
        per_query_head = c.view(2, 8).repeat_interleave(2, dim=0).flatten()  # (H*D,)
        shift = model.blocks[0].mixer.o_proj(per_query_head)
    assert torch.allclose(outs["ve"] - outs["plain"], shift.expand(2, 6, -1), atol=1e-5)


def test_unet_skips_add_mirrored_outputs_with_learned_weights():
    torch.manual_seed(0)
    model = LM(tiny(n_layers=4, unet_skips=True)).eval()
    assert [tuple(s.weight.shape) for s in model.unet_skips] == [(1,), (1,)]
    assert all(s.weight.item() == 1.0 for s in model.unet_skips)  # init: plain adds
    with torch.no_grad():
        model.unet_skips[0].weight.fill_(0.3)
        model.unet_skips[1].weight.fill_(-0.7)
    ins, outs = {}, {}

    def record(i):
        def hook(module, args, out):
            ins[i], outs[i] = args[0], out
        return hook

    for i, b in enumerate(model.blocks):
        b.register_forward_hook(record(i))
    with torch.no_grad():
        model(torch.randint(0, 64, (2, 6)))
    assert torch.allclose(ins[2], outs[1] + 0.3 * outs[1])  # block 1 -> block 2
    assert torch.allclose(ins[3], outs[2] - 0.7 * outs[0])  # block 0 -> block 3
    assert torch.equal(ins[1], outs[0])  # the first half runs as before
    assert len(LM(tiny(n_layers=5, unet_skips=True)).unet_skips) == 2  # middle block: none
    assert len(LM(tiny(n_layers=4)).unet_skips) == 0


def test_tricks_count_in_params_flops_memory_and_the_trace():
    base, cfg = tiny(n_layers=4), tiny(n_layers=4, value_embeds=2, unet_skips=True)
    scalars = 4 * 2 + 2  # value mixes in 4 layers, 2 skip weights
    K_D = cfg.kv_heads * cfg.head_size
    assert LM.count_params(cfg) == LM.count_params(base) + 2 * 64 * K_D + scalars
    # the tables are lookups: FLOPs grow only by the scalars, as every parameter counts
    assert flops_per_token(cfg) - flops_per_token(base) == 6 * scalars
    tokens = 8 * cfg.block_size
    kept = 4 * 2 * K_D + 2 * cfg.dim  # per token: lookups and values; skipped streams
    assert (estimate_training_bytes(cfg, 8) - estimate_training_bytes(base, 8)
            == 4 * (4 * (2 * 64 * K_D + scalars) + tokens * kept))
    t = LM(cfg).trace(torch.randint(0, 64, (1, 8)))
    rows = {r.path: r for r in t.rows}
    assert rows["value_embeds.tables.1"].out_shapes[0] == (1, 8, K_D)
    assert rows["blocks.3.mixer.value_mix"].out_shapes[0] == (1, 2, 8, cfg.head_size)
    assert rows["unet_skips.1"].out_shapes[0] == (1, 8, 32)


@pytest.mark.parametrize("trick", [dict(value_embeds=1), dict(unet_skips=True)])
def test_export_refuses_the_forward_path_tricks(trick):
    from minlm.interop import family_of

    assert family_of(tiny()) == "llama"
    with pytest.raises(ValueError, match=f"{next(iter(trick))}=.* has no counterpart"):
        family_of(tiny(**trick))


@pytest.mark.parametrize("overrides, match", [
    (dict(n_layers=2, value_embeds=2), r"value_embeds=2 is invalid: .* needs n_layers >= 4"),
    (dict(mixer="mlgru", position="none", value_embeds=1),
     r"value_embeds=1 .*only mixer 'attention' reads it"),
    (dict(block_spec=["norm>mlgru>+ norm>mlp>+", "norm>attn>+ norm>mlp>+"], value_embeds=1),
     r"value_embeds=1 is invalid: layer 0 gets a value embedding.* uses mlgru"),
    (dict(value_embeds=1, tied_blocks={"1": 0}), r"value_embeds=1 cannot be combined with tied"),
    (dict(value_embeds=-1), r"value_embeds=-1 is invalid: must be >= 0"),
])
def test_value_embeddings_are_refused_where_they_cannot_work(overrides, match):
    with pytest.raises(ConfigError, match=match):
        tiny(**overrides)


def test_run_folders_without_the_new_fields_still_load_and_dry_run_shows_them(capsys):
    old = tiny().to_dict()
    for name in ("zero_init_proj", "value_embeds", "unet_skips"):
        old.pop(name)
    assert ModelConfig.from_dict(old) == tiny()
    old_train = TrainConfig().to_dict()
    for name in ("decay_frac", "batch_warmup_iters", "batch_warmup_start"):
        old_train.pop(name)
    assert TrainConfig.from_dict(old_train) == TrainConfig()
    from minlm.cli import main

    assert main(["train", "preset=llama-1m", "schedule=wsd", "decay_frac=0.3",
                 "zero_init_proj=true", "tie_embeddings=false", "value_embeds=2",
                 "unet_skips=true", "batch_warmup_iters=50", "batch_warmup_start=0.5",
                 "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["model"]["value_embeds"] == 2 and shown["model"]["unet_skips"] is True
    assert shown["model"]["zero_init_proj"] is True
    assert shown["train"]["schedule"] == "wsd" and shown["train"]["decay_frac"] == 0.3
    assert shown["train"]["batch_warmup_iters"] == 50
    assert shown["train"]["batch_warmup_start"] == 0.5


# --- batch-size warm-up ----------------------------------------------------------------------

def test_batch_grows_linearly_to_batch_size_over_the_warmup():
    cfg = TrainConfig(batch_size=32, batch_warmup_iters=8, batch_warmup_start=0.25)
    assert [batch_size_at(s, cfg) for s in range(10)] == [8, 11, 14, 17, 20, 23, 26, 29, 32, 32]
    assert [batch_size_at(s, cfg, multiple=4) for s in range(3)] == [8, 8, 12]  # per process
    assert batch_size_at(0, cfg.replace(batch_size=2, batch_warmup_start=0.1), 2) == 2
    assert batch_size_at(0, TrainConfig(batch_size=32)) == 32  # off by default
    # epochs count the real tokens: the warm-up steps read fewer, so more steps are needed
    per_step = [batch_size_at(s, cfg) * 10 for s in range(8)]  # block_size 10
    assert epochs_to_steps(1.0, 1000, 320, per_step) == 7  # 930 tokens after 6, 1190 after 7
    assert epochs_to_steps(1.0, 1000, 320, per_step[:3]) == 3 + 3  # 330 + 3 x 320 >= 1000
    assert epochs_to_steps(1.0, 1000, 320) == 4
    with pytest.raises(ConfigError, match=r"batch_warmup_start=0.0 is invalid: must be in \("):
        TrainConfig(batch_warmup_start=0.0)


def _tiny_run(tmp_path, name, stop=None, callbacks=(), **kw):
    from minlm.train import train

    model_cfg = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=2,
                                        n_heads=2, n_kv_heads=1, block_size=32, dropout=0.1)
    base = dict(run_name=name, out_dir=str(tmp_path), max_iters=12, batch_size=8,
                batch_warmup_iters=8, batch_warmup_start=0.25, warmup_iters=2, eval_interval=6,
                eval_iters=2, log_interval=1, checkpoint_interval=100, max_docs=300,
                verbose=False, num_workers=1)
    cfg = TrainConfig(**{**base, **kw})
    return train(model_cfg, cfg, stop=stop, callbacks=callbacks)


@pytest.mark.usefixtures("shard_cache")
def test_batch_warmup_logs_real_tokens_and_resumes_exactly(tmp_path):
    """The tokens column adds each step's real batch; stopping inside the warm-up and
    resuming gives the weights and log of the run that went straight through."""
    from minlm.runs import load_run, read_log
    from minlm.train import StopFlag

    straight = _tiny_run(tmp_path, "a")
    sizes = [batch_size_at(s, TrainConfig(batch_size=8, batch_warmup_iters=8)) for s in range(12)]
    assert sizes[:3] == [2, 2, 3]
    log = read_log(straight.run_dir)
    assert log["tokens"].tolist() == [32 * sum(sizes[:k + 1]) for k in range(12)]
    assert straight.tokens == 32 * sum(sizes)
    stop = StopFlag()
    first = _tiny_run(tmp_path, "b", stop,
                      [lambda row: row["step"] >= 5 and stop.set("test stop")])
    assert first.step == 5
    resumed = _tiny_run(tmp_path, "b", resume=True)
    assert resumed.step == 12 and resumed.tokens == straight.tokens
    a, b = (load_run(r.run_dir).model.state_dict() for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)
    cols = ["step", "tokens", "lr", "train_loss", "val_loss", "grad_norm"]
    pd.testing.assert_frame_equal(read_log(resumed.run_dir)[cols], log[cols])


@pytest.mark.usefixtures("shard_cache")
def test_resume_refuses_a_changed_batch_warmup(tmp_path):
    from minlm.runs import RunError
    from minlm.train import StopFlag

    stop = StopFlag()
    stop.set("before start")
    _tiny_run(tmp_path, "c", stop)
    with pytest.raises(RunError, match="batch_warmup_iters: saved 8, given 4"):
        _tiny_run(tmp_path, "c", resume=True, batch_warmup_iters=4)
