"""Muon: ours takes PyTorch's steps exactly in bf16 (and up to bf16 rounding in fp32),
orthogonalises in fp32, and is chosen where PyTorch's bf16 Newton-Schulz steps would be
emulated."""

import pytest
import torch

from minlm import LM, ModelConfig, TrainConfig
from minlm.optim import Muon, make_optimizer, orthogonalise

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="PyTorch without torch.optim.Muon")
@pytest.mark.parametrize("ns_dtype", [torch.bfloat16, torch.float32])
def test_steps_equal_torch_muon(ns_dtype):
    """bf16: PyTorch's steps exactly; fp32 (minlm.fast's choice where bf16 is emulated): the
    same steps up to bf16 rounding."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(16, 48), (48, 16)]  # wide and tall
    ours = [torch.randn(s, generator=gen) for s in shapes]
    theirs = [p.clone() for p in ours]
    start = [p.clone() for p in ours]
    a = Muon(ours, lr=0.02, weight_decay=0.1, ns_dtype=ns_dtype)
    b = torch.optim.Muon(theirs, lr=0.02, weight_decay=0.1, adjust_lr_fn="match_rms_adamw")
    for _ in range(3):
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=gen)
            q.grad = p.grad.clone()
        a.step()
        b.step()
    for p, q, p0 in zip(ours, theirs, start):
        if ns_dtype == torch.bfloat16:
            torch.testing.assert_close(p, q, rtol=0, atol=0)
        else:  # the updates agree to bf16's few digits
            assert (p - q).norm() < 0.05 * (q - p0).norm()


def test_fp32_newton_schulz_pushes_singular_values_towards_one():
    g = torch.randn(64, 128, generator=torch.Generator().manual_seed(1))
    s = torch.linalg.svdvals(orthogonalise(g))
    assert s.min() > 0.6 and s.max() < 1.3, s
    assert orthogonalise(g.T).shape == (128, 64)


@pytest.mark.parametrize("fast_bf16", [True, False])
def test_cpu_muon_avoids_emulated_bf16(monkeypatch, fast_bf16):
    from minlm import flops

    monkeypatch.setattr(flops, "cpu_bf16_is_faster", lambda: fast_bf16)
    model = LM(ModelConfig(vocab_size=64, dim=32, n_layers=1, n_heads=2, block_size=8))
    opt = make_optimizer(model, TrainConfig(optimizer="muon"), torch.device("cpu"))
    muon = opt.optimizers[0]
    if fast_bf16 and hasattr(torch.optim, "Muon"):
        assert type(muon) is torch.optim.Muon
    else:
        assert type(muon) is Muon and muon.ns_dtype == torch.float32


def test_muon_takes_only_linear_weights_of_blocks():
    """Mamba's 2-D ``A_log`` (decays per channel and state) is no linear map: AdamW keeps it."""
    from minlm.optim import _split_params

    model = LM.from_preset("mamba-1m", n_layers=1)
    hidden, other, vectors = _split_params(model)
    names = {id(p): n for n, p in model.named_parameters()}
    hidden_names = {names[id(p)] for p in hidden}
    assert not any(n.endswith("A_log") for n in hidden_names)
    assert any(names[id(p)].endswith("A_log") for p in other)
    assert hidden_names and all(n.endswith(".weight") for n in hidden_names)


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_embed_lr_mult_scales_only_the_matrices_outside_the_blocks(optimizer):
    """The token embedding gets lr x embed_lr_mult, block matrices and vectors get lr, and the
    schedule scales every group by one factor (so the ratio holds through warm-up and decay)."""
    from minlm.optim import _split_params, set_lr

    model = LM(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, block_size=8))
    cfg = TrainConfig(optimizer=optimizer, lr=0.01, embed_lr_mult=3.0)
    opt = make_optimizer(model, cfg, torch.device("cpu"))
    hidden, _, vectors = _split_params(model)
    for lr in (0.01, 0.005):  # the base rate, then a point of the schedule
        set_lr(opt, lr, cfg.lr)
        lr_of = {id(p): g["lr"] for g in opt.param_groups for p in g["params"]}
        assert lr_of[id(model.embed.weight)] == pytest.approx(3 * lr)
        rest = [lr_of[id(p)] for p in hidden + vectors]
        assert rest == pytest.approx([lr] * len(rest))


def test_default_embed_lr_keeps_the_adamw_group_layout_of_older_checkpoints():
    model = LM(ModelConfig(vocab_size=64, dim=16, n_layers=1, n_heads=2, block_size=8))
    opt = make_optimizer(model, TrainConfig(optimizer="adamw"), torch.device("cpu"))
    assert [g["weight_decay"] for g in opt.param_groups] == [0.1, 0.0]
