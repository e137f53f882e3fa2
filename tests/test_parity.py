"""Parity with models nobody here wrote: Hugging Face Llama and GPT-2 on copied weights."""

import pytest
import torch

from minlm import LM

transformers = pytest.importorskip("transformers", reason="parity needs requirements-dev.txt")
from minlm.interop import to_hf_gpt2, to_hf_llama  # noqa: E402

# max |logit delta| against transformers measured by bench/numerics_spread.py across threads
# 1-3 and ATEN_CPU_CAPABILITY default / avx2: 2.03e-6 (llama), 1.67e-6 (gpt2); 2e-5 is 10x that
TOL = 2e-5


def _perturbed(name: str, **overrides) -> LM:
    """A preset with every weight moved off its init (norm gains of exactly 1 hide bugs)."""
    torch.manual_seed(0)
    model = LM.from_preset(name, **overrides).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model


@pytest.mark.numerics
@pytest.mark.parametrize("overrides", [{}, dict(n_kv_heads=1), dict(n_kv_heads=0, rope_theta=500.0),
                                       dict(tie_embeddings=False)])
def test_llama_matches_transformers(overrides):
    model = _perturbed("llama-1m", **overrides)
    hf = to_hf_llama(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 48))
    with torch.no_grad():
        ours = model(idx)[0]
        theirs = hf(idx).logits
    assert (ours - theirs).abs().max().item() < TOL


@pytest.mark.numerics
def test_gpt2_matches_transformers():
    model = _perturbed("gpt2-1m")
    hf = to_hf_gpt2(model)
    idx = torch.randint(0, model.config.vocab_size, (2, 48))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < TOL


@pytest.mark.numerics
def test_gpt2_with_kv_heads_spelled_out_is_still_gpt2():
    model = _perturbed("gpt2-1m", n_kv_heads=4, head_dim=32)  # = n_heads, = dim // n_heads
    hf = to_hf_gpt2(model)
    idx = torch.randint(0, model.config.vocab_size, (1, 16))
    with torch.no_grad():
        assert (model(idx)[0] - hf(idx).logits).abs().max().item() < TOL


def test_conversion_refuses_a_different_architecture():
    with pytest.raises(ValueError, match="a Llama model needs"):
        to_hf_llama(LM.from_preset("gpt2-0.5m"))
