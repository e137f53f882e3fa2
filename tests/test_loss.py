"""The fused head + cross-entropy must match the plain path: value and every gradient."""

import pytest
import torch

from minlm import LM, ModelConfig
from minlm.fast import fused_linear_cross_entropy
from minlm.loss import masked_cross_entropy


def tiny(**overrides) -> LM:
    torch.manual_seed(0)
    return LM(ModelConfig(vocab_size=97, block_size=16, dim=32, n_layers=2, n_heads=4,
                          n_kv_heads=2, **overrides))


def grads(model: LM) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("masked", [False, True])
def test_fused_loss_matches_plain_value_and_gradients(masked, monkeypatch):
    monkeypatch.setattr("minlm.fast.CHUNK_ELEMENTS", 97 * 7)  # several chunks, a ragged last one
    model = tiny()
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 97, (3, 16), generator=g)
    y = torch.randint(0, 97, (3, 16), generator=g)
    y[0, :5] = -100  # ignored targets
    mask = (torch.rand(3, 16, generator=g) > 0.3).float() if masked else None
    _, plain = model(x, y, loss_mask=mask)
    plain.backward()
    expected = grads(model)
    model.zero_grad(set_to_none=True)
    logits, fused = model(x, y, loss_mask=mask, return_logits=False)
    fused.backward()
    assert logits is None
    torch.testing.assert_close(fused, plain, rtol=1e-6, atol=1e-6)
    got = grads(model)
    assert got.keys() == expected.keys() and "embed.weight" in got  # the tied head gets its share
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-5, atol=1e-7, msg=name)


def test_fused_loss_scales_with_the_incoming_gradient():
    h = torch.randn(10, 8, requires_grad=True)
    w = torch.randn(13, 8, requires_grad=True)
    y = torch.randint(0, 13, (10,))
    (3.0 * masked_cross_entropy(h @ w.t(), y)).backward()
    expected = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    (3.0 * fused_linear_cross_entropy(h, w, y)).backward()
    torch.testing.assert_close((h.grad, w.grad), expected)


def test_fused_loss_under_bf16_autocast_keeps_parameter_dtypes():
    model = tiny()
    x = torch.randint(0, 97, (2, 16))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        _, plain = model(x, x)
        _, fused = model(x, x, return_logits=False)
    fused.backward()
    assert fused.dtype == torch.float32
    assert abs(fused.item() - plain.item()) < 0.05  # bf16 head either way
    assert all(p.grad.dtype == torch.float32 for p in model.parameters() if p.grad is not None)


def test_softcapped_logits_take_the_plain_path():
    model = tiny(logit_softcap=15.0)
    x = torch.randint(0, 97, (2, 16))
    logits, loss = model(x, x, return_logits=False)
    assert logits.shape == (2, 16, 97)
    torch.testing.assert_close(loss, masked_cross_entropy(logits, x))


def test_moe_aux_loss_is_added_on_the_fused_path_too():
    model = tiny(n_experts=4, experts_top_k=2)
    x = torch.randint(0, 97, (2, 16))
    _, plain = model(x, x)
    _, fused = model(x, x, return_logits=False)
    torch.testing.assert_close(fused, plain)
    assert model.aux_loss > 0
