"""The architecture zoo: every option builds, is causal, traces, and every family trains.

Tiny configs throughout (dim 32, 2 layers) so the whole file runs in well under two minutes
on a 2-core CPU.
"""

import math

import pytest
import torch
import torch.nn.functional as F

from minlm import LM, ModelConfig, trace
from minlm.config import ConfigError
from minlm.modules import KANLinear, MoE, alibi_slopes, attention_mask
from minlm.modules.bitlinear import (
    BitLinear,
    pack_ternary,
    quantize_activations,
    ternarize,
    unpack_ternary,
)
from minlm.modules.kan import GRID_RANGE
from minlm.modules.mlgru import linear_scan
from minlm.modules.moe import load_balancing_loss
from minlm.modules.position import ALiBi
from minlm.presets import PRESETS
from minlm.ternary import checkpoint_sizes, load_packed_model, pack_ternary_model

NEW_PRESETS = ["grok-1m", "alilama-2m", "lillm-39m", "matmulfree-1m", "bitnet-1m", "moe-1m",
               "mamba-1m", "griffin-1m", "hybrid-1m"]
FAMILIES = ["gpt2-1m", "llama-1m", *NEW_PRESETS]  # one preset per family


def tiny(name: str = "llama-1m", **overrides) -> ModelConfig:
    """A preset shrunk to dim 32, 2 layers, 512 tokens, keeping its family's options."""
    base = PRESETS[name]
    heads, kv = base["n_heads"], base.get("n_kv_heads", 0)
    layouts = base.get("block_spec", "")  # a per-layer list keeps one layer per layout
    shrink = dict(vocab_size=512, dim=32, block_size=32, n_heads=4, head_dim=0,
                  n_layers=len(layouts) if isinstance(layouts, list) else 2,
                  n_kv_heads=max(1, 4 * kv // heads) if kv else 0,
                  hidden_dim=64 if base.get("hidden_dim") else 0)
    return ModelConfig.from_preset(name, **{**shrink, **overrides})


def assert_causal(model: LM, T: int = 16, t: int = 9) -> None:
    """Changing token t changes no logits before t, and does change the logits at t."""
    V = model.config.vocab_size
    idx = torch.randint(0, V, (2, T))
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % V
    with torch.no_grad():
        a, _ = model(idx)
        b, _ = model(changed)
    assert (a[:, :t] - b[:, :t]).abs().max().item() < 1e-5  # MoE batches rows differently
    assert (a[:, t] - b[:, t]).abs().max().item() > 1e-4


# --- every option: shapes, finite gradients, causality -------------------------------------

OPTIONS = {
    "position=none": dict(position="none"),
    "position=learned": dict(position="learned"),
    "position=alibi": dict(position="alibi"),
    "rope_theta=100": dict(rope_theta=100.0),
    "mqa": dict(n_kv_heads=1),
    "gqa": dict(n_kv_heads=2),
    "mha": dict(n_kv_heads=0),
    "window=4": dict(window=4),
    "qk_norm": dict(qk_norm=True),
    "attn_softcap": dict(attn_softcap=5.0),
    "logit_softcap": dict(logit_softcap=10.0),
    "relu": dict(activation="relu"),
    "gelu": dict(activation="gelu"),
    "silu": dict(activation="silu"),
    "relu2": dict(activation="relu2"),
    "geglu": dict(activation="geglu", hidden_mult=3.0, multiple_of=16),
    "kan": dict(activation="kan", hidden_mult=1.0, kan_grid=4, kan_order=2),
    "layernorm": dict(norm="layernorm", norm_bias=True),
    "cosinenorm": dict(norm="cosinenorm"),
    "no affine": dict(norm_affine=False),
    "post-norms": dict(block_spec="norm>attn>norm>+ norm>mlp>norm>+"),
    "parallel": dict(block_spec="norm>attn|mlp>+"),
    "post-norm": dict(block_spec="attn>+>norm mlp>+>norm"),
    "embed_scale": dict(embed_scale=math.sqrt(32)),
    "untied": dict(tie_embeddings=False),
    "tied blocks": dict(n_layers=3, tied_blocks={"2": 0}),
    "xavier": dict(init="xavier"),
    "tfixup": dict(init="tfixup"),
    "mlgru": dict(mixer="mlgru", position="none"),
    "bitlinear": dict(linear="bitlinear"),
    "moe": dict(n_experts=4, experts_top_k=2),
    "moe top-1 kan": dict(n_experts=2, experts_top_k=1, activation="kan", hidden_mult=1.0),
    "mlgru parallel": dict(mixer="mlgru", position="learned", block_spec="norm>attn|mlp>+"),
}


@pytest.mark.parametrize("overrides", OPTIONS.values(), ids=OPTIONS.keys())
def test_option_shapes_gradients_and_causality(overrides):
    model = LM(tiny(**overrides))
    idx = torch.randint(0, 512, (2, 16))
    logits, loss = model(idx, targets=idx.roll(-1, 1))
    assert logits.shape == (2, 16, 512)
    loss.backward()
    assert torch.isfinite(loss)
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert_causal(model.eval())


# --- positions -----------------------------------------------------------------------------

def test_alibi_slopes_match_the_paper():
    assert alibi_slopes(8).tolist() == [1 / 2 ** i for i in range(1, 9)]
    # not a power of two: the paper's 4 slopes, then every other one of the 8-head sequence
    assert alibi_slopes(6).tolist() == [2 ** -2, 2 ** -4, 2 ** -6, 2 ** -8, 2 ** -1, 2 ** -3]
    bias = ALiBi(8)(torch.arange(5), torch.arange(5))  # (H, T, S)
    for h, m in enumerate(alibi_slopes(8).tolist()):
        for i in range(5):
            for j in range(i + 1):
                assert bias[h, i, j].item() == pytest.approx(-m * (i - j))


def test_alibi_scores_carry_the_bias_and_extrapolate():
    torch.manual_seed(0)
    model = LM(tiny(position="alibi", n_heads=8, n_kv_heads=0)).eval()
    idx = torch.randint(0, 512, (1, 6))
    t = model.trace(idx, capture=["mixer.q_heads", "mixer.k_heads", "mixer.scores"])
    q, k = t.tensors["blocks.0.mixer.q_heads"], t.tensors["blocks.0.mixer.k_heads"]
    scores = t.tensors["blocks.0.mixer.scores"]  # (B, H, T, S)
    plain = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    diff = scores - plain
    pos = torch.arange(6)
    dist = (pos[:, None] - pos[None, :]).float()
    for h, m in enumerate(alibi_slopes(8).tolist()):
        lower = torch.tril(torch.ones(6, 6, dtype=torch.bool))
        assert torch.allclose(diff[0, h][lower], -m * dist[lower], atol=1e-5)
    # no position table: runs (and stays causal) at twice the training length
    long = torch.randint(0, 512, (1, 2 * model.config.block_size))
    with torch.no_grad():
        assert torch.isfinite(model(long)[0]).all()
    assert_causal(model, T=64, t=50)
    with pytest.raises(ValueError, match="learned positions cannot extrapolate"):
        LM(tiny(position="learned"))(long)


def test_position_none_has_no_position_parts():
    model = LM(tiny(position="none"))
    names = {type(m).__name__ for m in model.modules()}
    assert not names & {"RoPE", "ALiBi", "LearnedPositions"}


# --- attention -----------------------------------------------------------------------------

def test_sliding_window_masks_exactly_outside_the_window():
    W, T = 4, 12
    model = LM(tiny(window=W)).eval()
    t = model.trace(torch.randint(0, 512, (2, T)), capture=["mixer.probs"])
    probs = t.tensors["blocks.0.mixer.probs"]  # (B, H, T, S)
    diff = torch.arange(T)[:, None] - torch.arange(T)[None, :]
    inside = (diff >= 0) & (diff < W)
    assert torch.all(probs[..., ~inside] == 0)
    assert torch.all(probs[..., inside] > 0)
    assert torch.equal(attention_mask(torch.arange(T), torch.arange(T), W), inside)


def test_fast_attention_path_matches_the_traced_explicit_one():
    """SDPA with a window + ALiBi mask (untraced) equals the explicit softmax (traced)."""
    model = LM(tiny(window=3, position="alibi")).eval()
    idx = torch.randint(0, 512, (2, 10))
    with torch.no_grad():
        fast = model(idx)[0]
        with trace(model):
            traced = model(idx)[0]
    assert torch.allclose(fast, traced, atol=1e-5)


def test_qk_norm_and_softcap_bound_the_scores():
    model = LM(tiny(qk_norm=True, attn_softcap=2.0)).eval()
    t = model.trace(torch.randint(0, 512, (1, 8)), capture=["mixer.scores", "mixer.q_norm"])
    scores = t.tensors["blocks.0.mixer.scores"]
    finite = scores[torch.isfinite(scores)]
    assert finite.abs().max() <= 2.0
    q = t.tensors["blocks.0.mixer.q_norm"]  # RMS-normalised per head, gain 1 at init
    assert torch.allclose(q.pow(2).mean(-1), torch.ones(q.shape[:-1]), atol=1e-2)


def test_kv_heads_set_the_projection_widths():
    D = 8
    for kv in (1, 2, 4):
        attn = LM(tiny(n_kv_heads=kv)).blocks[0].mixer
        assert attn.k_proj.weight.shape == (kv * D, 32) and attn.q_proj.weight.shape == (32, 32)


# --- MLPs and norms ------------------------------------------------------------------------

def test_gated_hidden_width_from_mult_and_multiple_of():
    cfg = tiny(activation="swiglu", dim=48, n_heads=4, hidden_mult=4.0, multiple_of=32)
    assert cfg.ffn_dim == 128  # 2/3 * 4 * 48 = 128
    cfg = cfg.replace(dim=40, n_heads=4)
    assert cfg.ffn_dim == 128  # 2/3 * 160 = 106 -> next multiple of 32
    assert tiny(activation="gelu", hidden_mult=3.0).ffn_dim == 96
    mlp = LM(tiny(activation="geglu", hidden_dim=40)).blocks[0].mlp
    assert mlp.gate.weight.shape == mlp.up.weight.shape == (40, 32)


def test_norm_variants():
    x = torch.randn(3, 5, 32) * 7
    cos = LM(tiny(norm="cosinenorm", norm_affine=False)).norm
    assert torch.allclose(cos(x).norm(dim=-1), torch.full((3, 5), math.sqrt(32)), atol=1e-4)
    assert sum(p.numel() for p in cos.parameters()) == 0
    ln = LM(tiny(norm="layernorm", norm_bias=True)).norm
    assert {n for n, _ in ln.named_parameters()} == {"weight", "bias"}
    assert torch.allclose(ln(x).mean(-1), torch.zeros(3, 5), atol=1e-5)


def test_post_norm_spec_builds_four_norms_in_order():
    model = LM(tiny("grok-1m", n_experts=0))
    t = model.trace(torch.randint(0, 512, (1, 4)))
    steps = [r.path.split(".")[-1] for r in t.rows if r.path.startswith("blocks.0.") and r.depth == 2]
    assert steps == ["norm1", "mixer", "norm2", "add1", "norm3", "mlp", "norm4", "add2"]


def test_unknown_block_step_lists_valid_steps():
    with pytest.raises(ConfigError, match=r"unknown step 'ffn'; valid steps are norm, mixer, "
                       r"attn, mlp, moe, \+ or a mixer \(attention, .*mlgru"):
        ModelConfig(block_spec="norm>attn>+ norm>ffn>+")
    with pytest.raises(ConfigError, match=r"unknown step 'gru'; valid steps are"):
        ModelConfig(block_spec="norm>attn|gru>+")


def test_embed_scale_scales_the_first_residual():
    model = LM(tiny(embed_scale=3.0)).eval()
    idx = torch.randint(0, 512, (1, 5))
    seen = {}
    hook = model.blocks[0].register_forward_pre_hook(lambda m, args: seen.setdefault("x", args[0]))
    with torch.no_grad():
        model(idx)
    hook.remove()
    assert torch.allclose(seen["x"], 3.0 * model.embed(idx))


def test_init_schemes():
    cfg = ModelConfig(dim=128, n_heads=4, n_layers=4, vocab_size=512, block_size=16)
    xav = LM(cfg.replace(init="xavier")).blocks[0].mixer
    fix = LM(cfg.replace(init="tfixup")).blocks[0].mixer
    xavier_std = math.sqrt(2 / (128 + 128))
    shrink = (9 * 4) ** -0.25
    assert xav.v_proj.weight.std().item() == pytest.approx(xavier_std, rel=0.05)
    assert fix.q_proj.weight.std().item() == pytest.approx(xavier_std, rel=0.05)
    assert fix.v_proj.weight.std().item() == pytest.approx(xavier_std * shrink, rel=0.05)
    gpt = LM(cfg)
    assert gpt.blocks[0].mlp.down.weight.std().item() == pytest.approx(cfg.std / math.sqrt(8), rel=0.05)


# --- tied blocks ---------------------------------------------------------------------------

def test_tied_blocks_share_storage_count_once_and_round_trip(tmp_path):
    from safetensors.torch import load_model, save_model

    cfg = tiny(n_layers=4, tied_blocks={"2": 0, "3": 1})
    model = LM(cfg).eval()
    assert model.blocks[2] is model.blocks[0]
    assert model.blocks[3].mixer.q_proj.weight.data_ptr() == model.blocks[1].mixer.q_proj.weight.data_ptr()
    untied = LM(cfg.replace(tied_blocks={}))
    per_block = sum(p.numel() for p in untied.blocks[0].parameters())
    assert model.num_params() == untied.num_params() - 2 * per_block
    save_model(model, str(tmp_path / "m.safetensors"))
    again = LM(cfg).eval()
    load_model(again, str(tmp_path / "m.safetensors"), strict=True)
    assert again.blocks[2] is again.blocks[0]
    idx = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], again(idx)[0])
    # a tied block is trained by both of its uses
    _, loss = again.train()(idx, targets=idx)
    loss.backward()
    assert again.blocks[0].mixer.q_proj.weight.grad.abs().sum() > 0


# --- BitLinear and the packed ternary export -----------------------------------------------

def test_bitlinear_is_ternary_with_8bit_activations_and_passes_gradients():
    torch.manual_seed(0)
    layer = BitLinear(32, 16)
    t, scale = ternarize(layer.weight)
    assert set(t.unique().tolist()) <= {-1.0, 0.0, 1.0}
    assert scale.item() == pytest.approx(layer.weight.abs().mean().item())
    q = layer.quantized_weight() / scale
    assert torch.equal(q, t)
    x = torch.randn(4, 7, 32, requires_grad=True)
    xq = quantize_activations(x)
    steps = xq * 127 / x.abs().amax(-1, keepdim=True)
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 128
    y = layer(x)
    assert y.shape == (4, 7, 16)
    y.square().sum().backward()
    assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0  # straight through
    assert x.grad.abs().sum() > 0
    assert layer.norm.weight.grad.abs().sum() > 0


def test_ternary_packing_round_trips():
    t = torch.randint(-1, 2, (7, 5)).float()  # 35 values: not a multiple of 4
    packed = pack_ternary(t)
    assert packed.dtype == torch.uint8 and packed.numel() == 9
    assert torch.equal(unpack_ternary(packed, (7, 5)), t)


@pytest.mark.parametrize("name", ["matmulfree-1m", "bitnet-1m"])
def test_packed_model_gives_the_same_logits(name, tmp_path):
    torch.manual_seed(0)
    model = LM(tiny(name, attn_bias=True, n_layers=3, tied_blocks={"2": 0})).eval()
    with torch.no_grad():  # move every weight off its init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    path = pack_ternary_model(model, tmp_path / "packed.safetensors")
    loaded = load_packed_model(path)
    assert type(loaded.blocks[0].mixer.o_proj).__name__ == "PackedBitLinear"
    assert loaded.blocks[2] is loaded.blocks[0]
    idx = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(model(idx)[0], loaded(idx)[0])
    assert "PackedBitLinear" in str(loaded.trace(idx[:, :4]))
    sizes = checkpoint_sizes(model, tmp_path / "sizes")
    assert sizes["ternary"] < sizes["bf16"] < sizes["fp32"]
    assert sizes["ternary+bf16"] < sizes["ternary"]


def test_bitlinear_quantises_each_weight_once_per_value_and_equals_the_formula():
    """The forward quantises the weight once per value of it (cached; an optimizer step or
    load_state_dict changes it in place and so invalidates the cache), with values and
    gradients exactly those of the formula F.linear(ste(x, q(x)), ste(w, q(w)), b)."""
    import minlm.modules.bitlinear as bl

    torch.manual_seed(0)
    layer = BitLinear(32, 16, bias=True)
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    calls = []
    real = bl.quantize_weight
    bl.quantize_weight = lambda w: calls.append(1) or real(w)
    try:
        for step in range(3):
            x = torch.randn(4, 7, 32)
            xs = [x.clone().requires_grad_() for _ in range(2)]
            y = layer(xs[0])
            layer(xs[0])  # a second forward of the same step (e.g. accumulation): no new call
            assert len(calls) == step + 1
            w = layer.weight.detach().clone().requires_grad_()
            ref = F.linear(bl.ste(layer.norm(xs[1]), quantize_activations(layer.norm(xs[1]))),
                           bl.ste(w, real(w)), layer.bias)
            assert torch.equal(y, ref)
            g = torch.randn_like(y)
            grads = torch.autograd.grad(y, [xs[0], layer.weight], g)
            ref_grads = torch.autograd.grad(ref, [xs[1], w], g)
            assert all(torch.equal(a, b) for a, b in zip(grads, ref_grads))
            layer.weight.grad = grads[1]
            opt.step()  # changes the weight in place: the next forward quantises again
        state = {k: v + 1 for k, v in layer.state_dict().items()}
        layer.load_state_dict(state)
        assert torch.equal(layer.quantized_weight(), real(layer.weight.detach()))
    finally:
        bl.quantize_weight = real


def test_packing_a_model_without_bitlinear_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no BitLinear layers"):
        pack_ternary_model(LM(tiny()), tmp_path / "x.safetensors")


# --- MLGRU ---------------------------------------------------------------------------------

def test_linear_scan_matches_the_loop():
    torch.manual_seed(0)
    a, b, h0 = torch.rand(2, 13, 5), torch.randn(2, 13, 5), torch.randn(2, 5)
    h, expected = h0, []
    for t in range(13):
        h = a[:, t] * h + b[:, t]
        expected.append(h)
    assert torch.allclose(linear_scan(a, b, h0), torch.stack(expected, 1), atol=1e-5)


class _LayerCache:
    """The per-layer cache interface: ``update`` for attention, ``state`` for the MLGRU."""

    def __init__(self):
        self.k = self.v = self.pos = None
        self.state = None

    def update(self, k, v, positions, key_valid):
        if self.k is not None:
            k, v = torch.cat([self.k, k], 2), torch.cat([self.v, v], 2)
            positions = torch.cat([self.pos, positions])
        self.k, self.v, self.pos = k, v, positions
        return k, v, positions, key_valid


class _Cache:
    def __init__(self, n_layers):
        self.layers = [_LayerCache() for _ in range(n_layers)]
        self.length = 0

    def layer(self, i):
        return self.layers[i]

    def advance(self, n):
        self.length += n


@pytest.mark.parametrize("name, overrides", [
    ("matmulfree-1m", {}),
    ("llama-1m", dict(n_layers=3, tied_blocks={"2": 0})),  # a tied block keeps its own cache
])
def test_incremental_decoding_matches_the_full_sequence(name, overrides):
    model = LM(tiny(name, **overrides)).eval()
    idx = torch.randint(0, 512, (2, 10))
    cache = _Cache(model.config.n_layers)
    with torch.no_grad():
        full = model(idx)[0]
        steps = [model(idx[:, :4], cache=cache)[0]]  # a prompt, then one token at a time
        steps += [model(idx[:, t:t + 1], cache=cache)[0] for t in range(4, 10)]
    assert torch.allclose(torch.cat(steps, 1), full, atol=1e-5)
    assert cache.length == 10


def test_mlgru_padding_leaves_the_state_alone():
    model = LM(tiny("matmulfree-1m")).eval()
    idx = torch.randint(0, 512, (1, 6))
    padded = torch.cat([torch.zeros(1, 3, dtype=torch.long), idx], 1)
    valid = torch.tensor([[False] * 3 + [True] * 6])
    with torch.no_grad():
        plain = model(idx)[0]
        masked = model(padded, key_valid=valid)[0]
    assert torch.allclose(masked[:, 3:], plain, atol=1e-5)


# --- mixture of experts --------------------------------------------------------------------

def test_moe_sends_each_token_to_exactly_k_experts():
    for k in (1, 2, 3):
        model = LM(tiny(n_experts=4, experts_top_k=k)).eval()
        t = model.trace(torch.randint(0, 512, (2, 9)), capture=["mlp.dispatch"])
        dispatch = t.tensors["blocks.0.mlp.dispatch"]  # (B, T, E)
        assert dispatch.shape == (2, 9, 4)
        assert torch.all(dispatch.sum(-1) == k)
        calls = [r for r in t.rows if r.path.startswith("blocks.0.mlp.experts.") and r.depth == 3]
        assert sum(r.in_shapes[0][0] for r in calls) == 2 * 9 * k  # tokens processed


def test_load_balancing_loss_is_one_when_uniform_and_grows_with_imbalance():
    N, E = 64, 4
    uniform = torch.full((N, E), 1 / E)
    chosen = torch.zeros(N, E).scatter(1, torch.randint(0, E, (N, 2)), 1.0)
    assert load_balancing_loss(uniform, chosen).item() == pytest.approx(1.0)
    balanced = torch.zeros(N, E).scatter(1, (torch.arange(N) % E)[:, None], 1.0)
    assert load_balancing_loss(torch.softmax(torch.randn(N, E), -1), balanced).item() == pytest.approx(1.0, abs=0.15)
    collapsed = torch.zeros(N, E)
    collapsed[:, 0] = 1
    assert load_balancing_loss(torch.full((N, E), 0.01).index_fill(1, torch.tensor([0]), 0.97), collapsed).item() > 3.5
    # a zero router is uniform routing: the model's aux loss is exactly 1
    model = LM(tiny(n_experts=4, experts_top_k=2))
    for m in model.modules():
        if isinstance(m, MoE):
            torch.nn.init.zeros_(m.router.weight)
    idx = torch.randint(0, 512, (2, 8))
    model(idx, targets=idx)
    assert model.aux_loss.item() == pytest.approx(1.0, abs=1e-6)


def test_aux_loss_is_added_to_the_training_loss_only():
    model = LM(tiny(n_experts=4, experts_top_k=2, aux_loss_weight=0.5))
    idx = torch.randint(0, 512, (2, 8))
    torch.manual_seed(1)
    _, train_loss = model.train()(idx, targets=idx)
    aux = model.aux_loss
    _, eval_loss = model.eval()(idx, targets=idx)
    assert aux.item() >= 1.0 - 1e-6
    assert train_loss.item() == pytest.approx(eval_loss.item() + 0.5 * aux.item(), abs=1e-5)
    train_loss.backward()
    router = model.blocks[0].mlp.router.weight
    assert router.grad.abs().sum() > 0
    dense = LM(tiny())
    dense(idx)
    assert float(dense.aux_loss) == 0.0


# --- KAN -----------------------------------------------------------------------------------

def test_kan_layer_shapes_partition_of_unity_and_gradients():
    torch.manual_seed(0)
    layer = KANLinear(6, 5, grid_size=5, order=3)
    x = torch.randn(2, 7, 6, requires_grad=True)
    y = layer(x)
    assert y.shape == (2, 7, 5)
    inside = torch.linspace(GRID_RANGE[0], GRID_RANGE[1] - 1e-4, 50)[:, None].expand(50, 6)
    bases = layer.b_splines(inside)  # (N, I, K)
    assert bases.shape == (50, 6, 8)
    assert torch.allclose(bases.sum(-1), torch.ones(50, 6), atol=1e-5)  # B-splines sum to 1
    y.square().sum().backward()
    assert layer.base_weight.grad.abs().sum() > 0
    assert layer.spline_weight.grad.abs().sum() > 0
    assert x.grad.abs().sum() > 0
    mlp = LM(tiny(activation="kan", hidden_mult=2.0, kan_grid=5, kan_order=3)).blocks[0].mlp
    assert sum(p.numel() for p in mlp.parameters()) == 2 * 32 * 64 * (1 + 5 + 3)


# --- config validation ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides, message", [
    (dict(mixer="mlgru"), r"position='rope' is invalid: no layer uses attention .*the layers "
                          r"use mlgru"),
    (dict(mixer="mlgru", position="none", window=8),
     r"window=8 is invalid: only mixer 'attention' reads it and no layer uses 'attention'"),
    (dict(mixer="gru"), r"mixer='gru' is not a registered token mixer; registered: attention, "),
    (dict(mixer="mlgru", position="none", mixer_options={"d_state": 4}),
     r"mixer_options has d_state=4, which no mixer in use \(mlgru\) declares"),
    (dict(linear="int4"), r"linear='int4' is invalid: must be one of 'linear', 'bitlinear'"),
    (dict(n_experts=4, experts_top_k=5), r"experts_top_k=5 is invalid: must be between 1 and n_experts=4"),
    (dict(n_experts=-1), r"n_experts=-1 is invalid"),
    (dict(embed_scale=0.0), r"embed_scale=0.0 is invalid: must be > 0"),
    (dict(aux_loss_weight=-1.0), r"aux_loss_weight=-1.0 is invalid"),
    (dict(kan_grid=0), r"kan_grid=0 is invalid"),
])
def test_invalid_zoo_options_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


# --- presets -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", NEW_PRESETS)
def test_new_preset_builds_runs_and_traces(name):
    model = LM.from_preset(name).eval()
    idx = torch.randint(0, model.config.vocab_size, (1, 8))
    text = str(model.trace(idx))
    assert text.splitlines()[1].split()[:2] == ["LM", "LM"]
    expected = {"grok-1m": "MoE", "alilama-2m": "LayerNorm", "lillm-39m": "RoPE",
                "matmulfree-1m": "MLGRU", "bitnet-1m": "BitLinear", "moe-1m": "experts.7",
                "mamba-1m": "Mamba", "griffin-1m": "Griffin", "hybrid-1m": "Attention"}[name]
    assert expected in text
    assert model.config == ModelConfig.from_json(model.config.to_json())


@pytest.mark.parametrize("name", FAMILIES)
def test_shrunk_preset_is_causal(name):
    assert_causal(LM(tiny(name)).eval())


def test_published_shapes():
    a = ModelConfig.from_preset("alilama-2m")
    assert (a.dim, a.n_layers, a.block_size, a.n_heads, a.ffn_dim, a.position, a.init) == \
        (128, 8, 128, 8, 512, "alibi", "xavier")
    ll = ModelConfig.from_preset("lillm-39m")
    assert (ll.dim, ll.n_layers, ll.n_heads, ll.kv_heads, ll.vocab_size, ll.block_size) == \
        (512, 12, 16, 8, 8192, 512)
    g = ModelConfig.from_preset("grok-1m")
    assert g.block_spec == "norm>attn>norm>+ norm>mlp>norm>+" and g.n_experts == 4


# --- every family trains on real text ------------------------------------------------------

@pytest.fixture(scope="module")
def tinystories(shared_data, tmp_path_factory):
    """The first 200 TinyStories documents in the shipped 512-token tokenizer, as shards."""
    from minlm.prepare import prepare
    from minlm.tokenizer import load_tokenizer, shipped_tokenizer_path

    tok = load_tokenizer(str(shipped_tokenizer_path(512)))
    return prepare("tinystories", tok, max_docs=200, num_workers=1, verbose=False,
                   cache_dir=tmp_path_factory.mktemp("zoo-shards"))


@pytest.mark.slow
@pytest.mark.parametrize("name", FAMILIES)
def test_every_family_learns_tinystories(name, tinystories):
    """100 AdamW steps on real text windows: the loss goes down for every family."""
    from minlm.data import get_batch

    torch.manual_seed(0)
    model = LM(tiny(name)).train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(100):
        x, y = get_batch(tinystories.train, 8, model.config.block_size, gen)
        _, loss = model(x, targets=y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    print(f"{name}: first 10 steps {first:.3f}, last 10 {last:.3f}")
    assert last < first - 0.5, (name, first, last)


def test_one_pass_activation_ste_matches_the_two_step_form():
    from minlm.modules.bitlinear import quantize_activations, quantize_activations_ste, ste

    x = torch.randn(6, 40, requires_grad=True)
    weights = torch.randn(6, 40)
    (ste(x, quantize_activations(x)) * weights).sum().backward()
    expected_grad = x.grad.clone()
    x.grad = None
    y = quantize_activations_ste(x)
    (y * weights).sum().backward()
    assert torch.equal(y, quantize_activations(x))
    assert torch.equal(x.grad, expected_grad)


# --- layouts: the seed projects' notation, per-layer lists, mixers by name ---------------------

def test_arrow_notation_builds_the_plain_pre_norm_block():
    from minlm.modules import PreNormBlock

    for spec in ("Norm->Attn->+->Norm->MLP->+", "norm > attn > + norm > mlp > +",
                 "NORM>MIXER>+>NORM>MLP>+"):
        model = LM(tiny(block_spec=spec))
        assert all(type(b) is PreNormBlock for b in model.blocks), spec
        assert [n for n, _ in model.blocks[0].named_children()] == ["norm1", "mixer", "norm2",
                                                                   "mlp"]


def test_layout_list_cycles_and_builds_the_parallel_moe_layout():
    from minlm.modules import MLP, MoE

    cfg = tiny(n_layers=4, n_experts=4, hidden_dim=32,
               block_spec=["Norm->Attn->+->Norm->MLP->+", "Norm->MoE->+"])
    model = LM(cfg)
    assert type(model.blocks[0].mlp) is MLP and type(model.blocks[2].mlp) is MLP
    assert type(model.blocks[1].moe) is MoE and not hasattr(model.blocks[1], "mixer")
    assert ModelConfig.from_json(cfg.to_json()) == cfg
    cli = ModelConfig().with_overrides(['block_spec=["norm>attn>+ norm>mlp>+", "norm>mlgru>+"]'])
    assert cli.block_spec == ["norm>attn>+ norm>mlp>+", "norm>mlgru>+"]
    with pytest.raises(ConfigError, match=r"n_experts=0 is invalid with a mixture of experts"):
        ModelConfig(block_spec=["norm>attn>+", "norm>moe>+"])


def test_a_layer_can_name_its_mixer():
    from minlm.modules import MLGRU, Attention

    cfg = tiny(mixer="mlgru", position="rope", n_layers=3,
               block_spec=["norm>mixer>+ norm>mlp>+", "norm>attention>+ norm>mlp>+"])
    model = LM(cfg)
    assert [type(b.mixer) for b in model.blocks] == [MLGRU, Attention, MLGRU]
    # attention options are accepted because one layer uses attention
    assert tiny(mixer="mlgru", position="none", window=4,
                block_spec=["norm>mlgru>+ norm>mlp>+", "norm>attention>+ norm>mlp>+"]).window == 4
