"""minlm.fast: every speed trick gives its reference's values and gradients, and the one
switch really chooses between them (the reference path never calls a trick). Muon's fp32
steps are checked against ``torch.optim.Muon`` beside its bf16 ones, in tests/test_optim.py."""

import os
import subprocess
import sys

import pytest
import torch

from minlm import LM, TrainConfig, fast
from minlm.loss import masked_cross_entropy
from minlm.modules.norm import RMSNorm
from minlm.modules.position import RoPE
from minlm.optim import Muon, make_optimizer

pytestmark = pytest.mark.usefixtures("one_thread")

TRICKS = ("rms_norm", "rope_rotate", "fused_linear_cross_entropy")


def both_ways(fn, *inputs):
    """fn(*inputs) and the gradients w.r.t. inputs and fn's parameters, with the switch on and
    off: ((value, grads) on, (value, grads) off)."""
    results = []
    for flag in (True, False):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        with fast.use(flag):
            out = fn(*leaves)
        params = list(getattr(fn, "parameters", lambda: [])())
        grads = torch.autograd.grad(out, leaves + params, torch.ones_like(out))
        results.append((out.detach(), grads))
    return results


def assert_equal_values_and_grads(on, off, rtol, atol):
    torch.testing.assert_close(on[0], off[0], rtol=rtol, atol=atol)
    for i, (a, b) in enumerate(zip(on[1], off[1])):
        torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=f"gradient {i}")


# --- the switch -----------------------------------------------------------------------------

def test_use_sets_and_restores_the_switch():
    assert fast.enabled()  # on by default
    with pytest.raises(RuntimeError), fast.use(False):
        assert not fast.enabled()
        raise RuntimeError
    assert fast.enabled()


def test_environment_turns_it_off_and_a_bad_value_is_named(monkeypatch):
    env = dict(os.environ, MINLM_FAST="0")
    out = subprocess.run([sys.executable, "-c", "import minlm.fast as f; print(f.enabled())"],
                         env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    monkeypatch.setenv("MINLM_FAST", "yes")
    with pytest.raises(ValueError, match=r"MINLM_FAST='yes' is invalid: must be 1 .* or 0"):
        fast._from_environment()


def tiny_llama(**overrides) -> LM:
    torch.manual_seed(0)
    return LM.from_preset("llama-1m", n_layers=1, vocab_size=64, block_size=16, dim=32, **overrides)


def test_reference_path_calls_no_trick(monkeypatch):
    from minlm import flops
    from minlm.generate import generate_ids

    def boom(*args, **kwargs):
        raise AssertionError("a speed trick ran with minlm.fast off")

    for name in TRICKS:
        monkeypatch.setattr(fast, name, boom)
    monkeypatch.setattr(flops, "cpu_bf16_is_faster", lambda: False)  # where fp32 Muon would run
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 12))
    with fast.use(False):
        _, loss = model(x, x, return_logits=False)
        loss.backward()
        model.eval()
        generate_ids(model, x[:, :4], 4, temperature=0)  # cached decoding: LM.step
        opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    if hasattr(torch.optim, "Muon"):
        assert type(opt.optimizers[0]) is torch.optim.Muon


def test_fast_path_calls_every_trick(monkeypatch):
    from minlm import flops

    calls = {name: 0 for name in TRICKS}
    for name in TRICKS:
        def counted(*args, _name=name, _fn=getattr(fast, name)):
            calls[_name] += 1
            return _fn(*args)
        monkeypatch.setattr(fast, name, counted)
    monkeypatch.setattr(flops, "cpu_bf16_is_faster", lambda: False)
    model = tiny_llama()
    x = torch.randint(0, 64, (2, 12))
    _, loss = model(x, x, return_logits=False)
    loss.backward()
    assert all(calls.values()), calls
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    assert type(opt.optimizers[0]) is Muon and opt.optimizers[0].ns_dtype == torch.float32


# --- one test per trick -------------------------------------------------------------------

def test_rms_norm_equals_the_formula_in_values_and_gradients():
    norm = RMSNorm(32)
    with torch.no_grad():
        norm.weight.normal_(1.0, 0.3)  # a gain of exactly 1 would hide a missing term
    x = torch.randn(3, 7, 32) * 2 + 0.5
    on, off = both_ways(norm, x)
    assert torch.equal(on[0], off[0])  # the same formula: the same bits
    assert_equal_values_and_grads(on, off, rtol=1e-5, atol=1e-6)


def test_rms_norm_leaves_bf16_and_gainless_calls_to_the_reference(monkeypatch):
    monkeypatch.setattr(fast, "rms_norm", lambda *a: pytest.fail("fast.rms_norm on bf16"))
    norm = RMSNorm(32).to(torch.bfloat16)
    on, off = both_ways(norm, torch.randn(3, 7, 32, dtype=torch.bfloat16))
    assert_equal_values_and_grads(on, off, rtol=0, atol=0)
    on, off = both_ways(RMSNorm(32, affine=False), torch.randn(3, 7, 32))
    assert_equal_values_and_grads(on, off, rtol=0, atol=0)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("per_row", [False, True])
def test_rope_rotation_equals_rotate_half(dtype, tol, per_row):
    rope = RoPE(head_dim=16, max_len=8)  # positions run past the table: it is rebuilt
    positions = torch.arange(12)  # (T,), or (B, T) per row:
    positions = torch.stack([positions + 3, positions]) if per_row else positions
    x = torch.randn(2, 4, 12, 16, dtype=dtype)  # (B, H, T, D)
    on, off = both_ways(lambda x: rope(x, positions), x)
    assert_equal_values_and_grads(on, off, rtol=tol, atol=tol)
    # one decoding position: views of the tables instead of a gather
    on, off = both_ways(lambda x: rope(x, torch.tensor([5])), x[:, :, :1])
    assert_equal_values_and_grads(on, off, rtol=tol, atol=tol)


@pytest.mark.parametrize("masked", [False, True])
def test_fused_loss_equals_head_then_cross_entropy(masked, monkeypatch):
    monkeypatch.setattr(fast, "CHUNK_ELEMENTS", 13 * 7)  # several chunks, a ragged last one
    g = torch.Generator().manual_seed(1)
    h, w = torch.randn(3, 10, 8, generator=g), torch.randn(13, 8, generator=g)
    y = torch.randint(0, 13, (3, 10), generator=g)
    y[0, :4] = -100
    mask = (torch.rand(3, 10, generator=g) > 0.3).float() if masked else None

    def loss(h, w):
        if fast.enabled():
            return fast.fused_linear_cross_entropy(h, w, y, mask)
        return masked_cross_entropy(h @ w.t(), y, mask)

    on, off = both_ways(loss, h, w)
    assert_equal_values_and_grads(on, off, rtol=1e-5, atol=1e-6)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 head either way
        on, off = both_ways(loss, h, w)
    assert on[0].dtype == torch.float32 and on[1][1].dtype == torch.float32
    assert_equal_values_and_grads(on, off, rtol=2e-2, atol=2e-2)


# --- the whole model ----------------------------------------------------------------------

def llama_step_with_and_without_tricks():
    """(loss, gradients) of one trainer-style step of llama-1m (two layers) with the fast
    switch on, then off (bench/numerics_spread.py measures the same step)."""
    torch.manual_seed(0)
    model = LM.from_preset("llama-1m", n_layers=2)
    g = torch.Generator().manual_seed(2)
    x = torch.randint(0, 2048, (2, 64), generator=g)
    y = torch.randint(0, 2048, (2, 64), generator=g)
    results = []
    for flag in (True, False):
        model.zero_grad(set_to_none=True)
        with fast.use(flag):
            _, loss = model(x, y, return_logits=False)
            loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    return results


@pytest.mark.numerics
def test_llama_training_step_is_the_same_with_and_without_tricks():
    """A trainer-style forward and backward of llama-1m (two layers): loss, every gradient."""
    (loss_on, grads_on), (loss_off, grads_off) = llama_step_with_and_without_tricks()
    # measured by bench/numerics_spread.py (threads 1-3, ATEN_CPU_CAPABILITY default / avx2):
    # loss |delta| 4.77e-7 (the bound here is 1e-6 + 1e-6 |loss|, about 8.6e-6: 18x); gradient
    # |delta| beyond 1e-4 |ref| at most 1.0e-8 (atol 1e-7: 10x)
    torch.testing.assert_close(loss_on, loss_off, rtol=1e-6, atol=1e-6)
    assert grads_on.keys() == grads_off.keys() and "embed.weight" in grads_on
    for name in grads_on:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-4, atol=1e-7,
                                   msg=name)
