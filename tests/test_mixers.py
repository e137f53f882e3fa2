"""Tests generated from the registries: every registered token mixer, channel mixer, norm and
positional scheme, with each option it declares, is checked for forward shapes, causality
(a ``causal=False`` mixer: that it sees the future), loss at init, cached decoding against
the full forward (a bidirectional mixer: that decoding is refused), trace rows, declared
FLOPs and memory. Experiments in experiments/ are loaded first, so their entries are covered
too; an entry without a case here fails ``test_every_entry_of_every_registry_is_covered``.

Tiny models (dim 32, 2 layers, vocab 64, context 24) with weights moved off their init for
the decoding checks, so logits are of order one and 2e-5 (CACHE_TOL) means something.
"""

import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from minlm import LM, ModelConfig
from minlm.errors import ConfigError as ConfigErrorType
from minlm.generate import TokenStream
from minlm.modules import registry
from minlm.modules.attention import Attention

pytestmark = pytest.mark.usefixtures("one_thread")
# cached decoding against recomputation: max |logit delta| measured by bench/numerics_spread.py
# across threads 1-3 and ATEN_CPU_CAPABILITY default / avx2 is 1.95e-6 (attention variants)
# and 3.04e-6 (every mixer); 2e-5 leaves 6.5x over the largest, against logits of order one
CACHE_TOL = 2e-5

for _pkg in sorted(registry.EXPERIMENTS_DIR.glob("*/__init__.py")):
    registry.load_experiment(_pkg.parent.name)


def _bidirectional_flops(cfg, T: int) -> float:
    return 4 * cfg.n_heads * cfg.head_size * T  # scores and weighted sum over all T keys


def _bidirectional_memory(cfg, T: int) -> float:  # as causal attention's: SDPA saves the same
    H, K, D = cfg.n_heads, cfg.kv_heads, cfg.head_size
    return cfg.dim + 2 * H * D + 2 * K * D + H


@registry.register_mixer("bidirectional_fixture", causal=False, positional=True,
                         flops=_bidirectional_flops, memory=_bidirectional_memory)
class BidirectionalFixture(Attention):
    """Attention without the causal mask: every position sees the whole sequence (a test
    fixture for ``causal=False``; the generated tests must check it sees the future)."""

    def _attend(self, q, k, v, q_pos, k_pos, key_valid):
        mask = None if key_valid is None else key_valid[:, None, None, :]  # (B, 1, 1, S)
        return torch.nn.functional.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=k.shape[1] != q.shape[1])


MIXERS = registry.mixers()
CHANNELS = registry.channel_mixers()
NORMS = registry.norms()
POSITIONS = registry.positions()


def _experiment(spec) -> str:
    """The experiments/ folder that registered ``spec`` (any registry's; '' for a built-in)."""
    module = registry.defined_in(spec)
    return module.removeprefix("minlm_experiment_").split(".")[0] \
        if module.startswith("minlm_experiment_") else ""


def mixer_config(name: str, **opts) -> ModelConfig:
    spec = MIXERS[name]
    fields, options = dict(spec.requires), {}
    for k, v in opts.items():
        (options if k in spec.options else fields)[k] = v
    base = dict(vocab_size=64, block_size=24, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                mixer=name, position="rope" if spec.positional else "none",
                mixer_options=options, experiment=_experiment(spec))
    return ModelConfig.from_preset("llama-1m", **{**base, **fields})


def channel_config(name: str, **opts) -> ModelConfig:
    spec = CHANNELS[name]
    fields, options = dict(spec.requires), {}
    for k, v in opts.items():
        (options if k in spec.options else fields)[k] = v
    base = dict(vocab_size=64, block_size=24, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                mlp=name, mixer_options=options, experiment=_experiment(spec))
    return ModelConfig.from_preset("llama-1m", **{**base, **fields})


def norm_config(name: str, **opts) -> ModelConfig:
    """Attention and an MLP around the norm ``name`` (every norm of the model is it)."""
    base = dict(vocab_size=64, block_size=24, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                norm=name, experiment=_experiment(NORMS[name]))
    return ModelConfig.from_preset("llama-1m", **{**base, **NORMS[name].requires, **opts})


def position_config(name: str, **opts) -> ModelConfig:
    """Attention (which reads positions) with the positional scheme ``name``."""
    base = dict(vocab_size=64, block_size=24, dim=32, n_layers=2, n_heads=4, n_kv_heads=2,
                position=name, experiment=_experiment(POSITIONS[name]))
    return ModelConfig.from_preset("llama-1m", **{**base, **opts})


CONFIGS = {"mixer": mixer_config, "channel": channel_config, "norm": norm_config,
           "position": position_config}
REGISTRIES = {"mixer": MIXERS, "channel": CHANNELS, "norm": NORMS, "position": POSITIONS}


def _cases(table: dict) -> list:
    return [(n, {}) for n in table] + [(n, {k: v}) for n, s in table.items()
                                       for k, v in s.examples.items()]


MIXER_CASES, CHANNEL_CASES = _cases(MIXERS), _cases(CHANNELS)
NORM_CASES, POSITION_CASES = _cases(NORMS), _cases(POSITIONS)
# model-level options that change the forward path around the mixers (U-net skips with
# every mixer; value embeddings with a layer between the two that share a table)
MODEL_CASES = [(n, {"unet_skips": True}) for n in MIXERS] + [
    ("attention", {"n_layers": 3, "value_embeds": 1, "unet_skips": True})]
CASES = ([("mixer", n, o) for n, o in MIXER_CASES + MODEL_CASES]
         + [("channel", n, o) for n, o in CHANNEL_CASES]
         + [("norm", n, o) for n, o in NORM_CASES]
         + [("position", n, o) for n, o in POSITION_CASES])
IDS = [f"{kind}:{n}" + "".join(f"-{k}={v}" for k, v in o.items()) for kind, n, o in CASES]


def build(kind: str, name: str, opts: dict, perturb: bool = False) -> LM:
    torch.manual_seed(0)
    cfg = CONFIGS[kind](name, **opts)
    model = LM(cfg).eval()
    if perturb:
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.1)
    return model


def _reached(kind: str, test) -> set:
    """The entries of registry ``kind`` that the parametrised test function ``test`` runs."""
    names = set()
    for mark in getattr(test, "pytestmark", []):
        if mark.name != "parametrize":
            continue
        argnames = [a.strip() for a in (mark.args[0].split(",") if isinstance(mark.args[0], str)
                                        else mark.args[0])]
        for values in mark.args[1]:
            row = dict(zip(argnames, values if len(argnames) > 1 else [values]))
            if row.get("kind", kind) == kind and "name" in row:
                names.add(row["name"])
    return names


# what every entry of each registry must be reached by (by the test's own parametrisation)
REQUIRED = {
    "mixer": ["test_forward_shapes_causality_and_loss_at_init",
              "test_cached_decoding_equals_full_forward",
              "test_trace_shows_the_mixer_and_its_inner_steps",
              "test_declared_flops_match_the_flop_counter", "test_trace_total_is_the_flops_estimate",
              "test_declared_memory_is_within_10_percent_of_what_backward_keeps"],
    "channel": ["test_forward_shapes_causality_and_loss_at_init",
                "test_cached_decoding_equals_full_forward", "test_part_trace_and_flops",
                "test_part_memory_is_within_10_percent_of_what_backward_keeps"],
    "norm": ["test_forward_shapes_causality_and_loss_at_init",
             "test_cached_decoding_equals_full_forward", "test_part_trace_and_flops",
             "test_part_memory_is_within_10_percent_of_what_backward_keeps"],
    "position": ["test_forward_shapes_causality_and_loss_at_init",
                 "test_cached_decoding_equals_full_forward", "test_part_trace_and_flops",
                 "test_part_memory_is_within_10_percent_of_what_backward_keeps"],
}


def test_every_entry_of_every_registry_is_covered():
    """Each entry of each registry (token mixers, channel mixers, norms, positional schemes)
    is reached by every generated test that applies to its kind, and each option or config
    field it declares has an example value the tests build a model with."""
    tables = {"mixer": registry.mixers(), "channel": registry.channel_mixers(),
              "norm": registry.norms(), "position": registry.positions()}
    assert set(tables) == set(REQUIRED)
    for kind, table in tables.items():
        for test_name in REQUIRED[kind]:
            missing = set(table) - _reached(kind, globals()[test_name])
            assert not missing, f"{kind} entries {sorted(missing)} are not reached by {test_name}"
        for spec in table.values():
            declared = set(getattr(spec, "options", {})) | set(spec.config_fields)
            missing = declared - set(spec.examples)
            assert not missing, f"{spec.name} declares {missing} without an example value"


def test_the_coverage_check_catches_an_entry_no_test_reaches():
    """An entry registered after the cases were generated is reached by no test: the check
    that guards every registry sees it."""
    registry.register_norm("uncovered_fixture")(type("Uncovered", (torch.nn.Identity,), {}))
    try:
        with pytest.raises(AssertionError, match=r"norm entries \['uncovered_fixture'\]"):
            test_every_entry_of_every_registry_is_covered()
    finally:
        registry._NORMS.pop("uncovered_fixture")


@pytest.mark.parametrize("kind, name, opts", CASES, ids=IDS)
def test_forward_shapes_causality_and_loss_at_init(kind, name, opts):
    model = build(kind, name, opts)
    idx = torch.randint(0, 64, (2, 12))
    targets = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        logits, loss = model(idx, targets)
        assert logits.shape == (2, 12, 64)
        assert abs(loss.item() - math.log(64)) < 0.3  # near-uniform predictions at init
        changed = idx.clone()
        changed[:, 6:] = (changed[:, 6:] + 1) % 64
        logits2, _ = model(changed)
    # the future never leaks back. Exact for every mixer but MoE: there the tokens each expert
    # gets (so its matmul's shape, so the order of the float sums) depend on the whole batch,
    # and the past's logits move in the last bits: at most 5.96e-8 measured over 5 seeds, with
    # ATEN_CPU_CAPABILITY default and avx2 (AMD EPYC). A leak moves them by ~1e-2; 1e-6 is
    # 17x the measured spread.
    if kind == "mixer" and not MIXERS[name].causal:  # bidirectional: it must see the future
        assert not torch.allclose(logits[:, :6], logits2[:, :6])
    else:
        torch.testing.assert_close(logits[:, :6], logits2[:, :6], rtol=0, atol=1e-6)
    assert not torch.allclose(logits[:, 6:], logits2[:, 6:])


def _stream(model, prompts, n, **kw):
    s = TokenStream(model, prompts, n, keep_logits=True, temperature=0, **kw)
    for _ in s:
        pass
    return s.new_tokens.clone(), torch.stack(s.logits)


@pytest.mark.numerics
@pytest.mark.parametrize("kind, name, opts", CASES, ids=IDS)
def test_cached_decoding_equals_full_forward(kind, name, opts):
    """30 new tokens after a 7-token prompt also cross the context (24) for bounded mixers;
    the fast path (LM.step), the cache through LM.forward and a left-padded batch all match
    recomputing the whole context each step."""
    model = build(kind, name, opts, perturb=True)
    prompt = torch.randint(0, 64, (2, 7))
    if kind == "mixer" and not MIXERS[name].causal:  # no left-to-right decoding: one line
        with pytest.raises(ConfigErrorType, match=rf"^mixer='{name}' is bidirectional "
                                                  r"\(causal=False\): it cannot decode"):
            _stream(model, prompt, 3)
        return
    ref_ids, ref_logits = _stream(model, prompt, 30, use_cache=False)
    assert ref_logits.abs().max() > 0.5  # the tolerance is small against the logits
    for kw in (dict(fast=True), dict(fast=False)):
        ids, logits = _stream(model, prompt, 30, **kw)
        assert (logits - ref_logits).abs().max().item() < CACHE_TOL, kw
        assert torch.equal(ids, ref_ids), kw
    rows = [[1, 5, 9], [1, 7, 3, 30, 12, 8]]
    ids, logits = _stream(model, rows, 6)
    for r, row in enumerate(rows):
        alone_ids, alone_logits = _stream(model, [row], 6)
        assert torch.equal(ids[r], alone_ids[0])
        assert (logits[:, r] - alone_logits[:, 0]).abs().max().item() < CACHE_TOL


@pytest.mark.parametrize("name", list(MIXERS))
def test_trace_shows_the_mixer_and_its_inner_steps(name):
    model = build("mixer", name, {})
    t = model.trace(torch.randint(0, 64, (2, 8)))
    rows = {r.path: r for r in t.rows}
    assert rows["blocks.0.mixer"].out_shapes[0] == (2, 8, 32)
    inner = [p for p in rows if p.startswith("blocks.0.mixer.")]
    assert len(inner) >= 3, inner


@pytest.mark.parametrize("name", list(MIXERS))
def test_declared_flops_match_the_flop_counter(name):
    """The registration's FLOPs per token plus 2 x its weights equal what torch's FLOP counter
    measures over one forward of the mixer (SDPA in its math form, which the counter sees)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # Mamba's default conv form is element-wise multiply-adds, which the counter does not see;
    # its reference form is F.conv1d, which it does (the same work)
    model = build("mixer", name, {"conv": "reference"} if name == "mamba" else {})
    mixer = model.blocks[0].mixer
    B, T = 2, 16
    x = torch.randn(B, T, 32)
    with FlopCounterMode(display=False) as counter, torch.no_grad(), \
            sdpa_kernel(SDPBackend.MATH):
        mixer(x, positions=torch.arange(T))
    weights = sum(m.weight.numel() for m in mixer.modules() if isinstance(m, torch.nn.Linear))
    expected = B * T * (2 * weights + MIXERS[name].flops(model.config, T))
    assert counter.get_total_flops() == expected


@pytest.mark.parametrize("name", list(MIXERS))
def test_trace_total_is_the_flops_estimate(name):
    """A trace's whole-model FLOPs (linear layers plus each mixer's declared work: attention
    maps, Mamba's and Griffin's convolutions) are minlm.flops' forward estimate, less 2 per
    token for each parameter outside a linear layer's weight (norm gains, biases, conv taps,
    decay tables), which the PaLM-style estimate counts as a matmul weight; that difference
    stays under 10 % of the estimate."""
    from minlm.flops import forward_flops_per_token

    model = build("mixer", name, {})
    B, T = 2, 16
    total = model.trace(torch.randint(0, 64, (B, T))).rows[0].flops
    estimate = B * T * forward_flops_per_token(model.config, T)
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    outside = model.matmul_params() - linear
    assert total == estimate - 2 * B * T * outside, (total, estimate, outside)
    assert total >= 0.9 * estimate


# --- cross-attention (standalone: queries from one sequence, keys/values from another) --------

def test_cross_attention_shapes_mask_and_trace():
    from minlm.modules import CrossAttention

    torch.manual_seed(0)
    xattn = CrossAttention(dim=32, n_heads=4, context_dim=24).eval()
    x, context = torch.randn(2, 5, 32), torch.randn(2, 7, 24)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False  # row 1: the last three context tokens are padding
    y = xattn(x, context, mask)
    assert y.shape == (2, 5, 32)
    changed = context.clone()
    changed[1, 4:] += 10.0  # padding may hold anything
    changed_y = xattn(x, changed, mask)
    assert torch.allclose(y[1], changed_y[1]) and torch.equal(y[0], changed_y[0])
    assert not torch.allclose(y[1], xattn(x, changed)[1])  # unmasked, padding matters
    # the same as multi-head attention by hand: softmax(q k^T / sqrt(D)) v
    q = xattn.q_proj(x[:1]).view(1, 5, 4, 8).transpose(1, 2)
    k = xattn.k_proj(context[:1]).view(1, 7, 4, 8).transpose(1, 2)
    v = xattn.v_proj(context[:1]).view(1, 7, 4, 8).transpose(1, 2)
    ref = torch.softmax(q @ k.transpose(-2, -1) / 8 ** 0.5, -1) @ v
    assert torch.allclose(y[:1], xattn.o_proj(ref.transpose(1, 2).reshape(1, 5, 32)), atol=1e-6)
    per_query = torch.ones(2, 5, 7, dtype=torch.bool)
    per_query[:, 0] = False  # query 0 sees nothing: zeros, not NaN
    assert torch.equal(xattn(x, context, per_query)[:, 0], xattn.o_proj(torch.zeros(2, 32))[:, :])
    t = xattn.trace(x, context, mask)
    shapes = {r.path: r.out_shapes[0] for r in t.rows}
    assert shapes["scores"] == (2, 4, 5, 7) and shapes["k_heads"] == (2, 4, 7, 8)


# --- experiments: loaded by name on the command line, recorded in the run folder --------------

def test_experiment_trains_from_the_command_line_and_reloads(tmp_path):
    """The experiment's mixer is added without editing minlm/: `experiment=diffattn` on the
    command line registers it; the run folder records it; load_run in a fresh process (where
    nothing was imported) rebuilds the model and generates."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo)}
    cmd = [sys.executable, "-m", "minlm", "train", "experiment=diffattn", "mixer=diffattn",
           "dim=32", "n_layers=2", "n_heads=2", "n_kv_heads=0", "block_size=32",
           "vocab_size=512", "max_iters=3", "batch_size=4", "eval_interval=3", "eval_iters=1",
           "max_docs=200", "warmup_iters=1", f"out_dir={tmp_path}", "run_name=diff"]
    p = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    saved = (tmp_path / "diff" / "model_config.json").read_text()
    assert '"experiment": "diffattn"' in saved and '"mixer": "diffattn"' in saved
    code = ("from minlm.runs import load_run; from minlm.generate import generate; "
            f"r = load_run({str(tmp_path / 'diff')!r}); "
            "print(type(r.model.blocks[0].mixer).__name__); "
            "print(len(generate(r.model, r.tokenizer, 'Once', 5, temperature=0)) >= 0)")
    p = subprocess.run([sys.executable, "-c", code], cwd=repo, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    assert p.stdout.split() == ["DiffAttention", "True"]


def test_an_experiment_imported_under_two_names_registers_once(tmp_path):
    """`python -m experiments.<idea>.run` imports the package as ``experiments.<idea>`` and
    then, through ``experiment=<idea>``, as the loader's own module: the same classes from the
    same files register again without complaint; another class under a taken name is still
    refused."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    code = ("import experiments.diffattn\n"
            "from minlm import ModelConfig, LM\n"
            "from minlm.modules import registry\n"
            "cfg = ModelConfig.from_preset('diffattn-1m', experiment='diffattn')\n"
            "print(type(LM(cfg).blocks[0].mixer).__name__)\n"
            "try:\n"
            "    registry.register_mixer('diffattn')(type('Other', (registry.TokenMixer,), {}))\n"
            "except ValueError as e:\n"
            "    print(e)\n")
    p = subprocess.run([sys.executable, "-c", code], cwd=repo, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(repo)}, timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    lines = p.stdout.splitlines()
    assert lines[0] == "DiffAttention"
    assert "'diffattn' is already registered by" in lines[1] and "pick another name" in lines[1]


def test_unknown_experiment_lists_the_available_ones():
    from minlm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"experiment='nope' is neither .* available: .*diffattn"):
        ModelConfig(experiment="nope")
    with pytest.raises(ConfigError, match=r"unknown preset 'diffattn-2m'.*experiment="):
        ModelConfig.from_preset("diffattn-2m")


@pytest.mark.parametrize("kind, name, opts", [c for c in CASES if not c[2]],
                         ids=[i for c, i in zip(CASES, IDS) if not c[2]])
def test_training_resumes_exactly_from_saved_state(kind, name, opts):
    """Everything a mixer needs to continue training is in the state dicts: two steps, save,
    load into a model built from another seed, one more step on both: identical weights."""
    import io

    model = build(kind, name, opts).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batches = [torch.randint(0, 64, (2, 12)) for _ in range(3)]

    def step(m, o, x):
        _, loss = m(x, torch.roll(x, -1, 1))
        o.zero_grad()
        loss.backward()
        o.step()

    for x in batches[:2]:
        step(model, opt, x)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    torch.manual_seed(123)
    other = LM(model.config).train()
    other_opt = torch.optim.AdamW(other.parameters(), lr=1e-2)
    other.load_state_dict(saved["model"])
    other_opt.load_state_dict(saved["opt"])
    step(model, opt, batches[2])
    step(other, other_opt, batches[2])
    for (k, a), b in zip(model.state_dict().items(), other.state_dict().values()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("name", list(MIXERS))
def test_declared_memory_is_within_10_percent_of_what_backward_keeps(name):
    """The registration's values per token against the tensors one forward of the mixer saves
    for backward (``minlm.memory.saved_values_per_token``: counted by storage, weights
    excluded), at batch 8 and context 32."""
    from minlm.memory import saved_values_per_token

    model = build("mixer", name, {})
    mixer = model.blocks[0].mixer.train()
    B, T = 8, 32
    x = torch.randn(B, T, 32, requires_grad=True)
    measured = saved_values_per_token(mixer, x, positions=torch.arange(T))
    declared = MIXERS[name].memory(model.config, T)
    assert abs(declared - measured) <= 0.1 * measured, (declared, measured)


# --- channel mixers, norms and positional schemes: the part itself ----------------------------

PART_CASES = [(kind, n, o) for kind, n, o in CASES if kind != "mixer"]
PART_IDS = [i for (kind, *_), i in zip(CASES, IDS) if kind != "mixer"]


def _part(model: LM, kind: str):
    """(path in a trace, module) of the part under test in block 0 (or on the input)."""
    if kind == "channel":
        return "blocks.0.mlp", model.blocks[0].mlp
    if kind == "norm":
        return "blocks.0.norm1", model.blocks[0].norm1
    return "pos", model.pos


@pytest.mark.parametrize("kind, name, opts", PART_CASES, ids=PART_IDS)
def test_part_trace_and_flops(kind, name, opts):
    """The part's trace row has the stream's shape and, per token, the FLOPs its registration
    declares; torch's FLOP counter over one forward of it measures no more than that (the
    declaration may add element-wise work a trace counts, as KAN's B-splines)."""
    model = build(kind, name, opts)
    path, part = _part(model, kind)
    B, T = 2, 8
    t = model.trace(torch.randint(0, 64, (B, T)))
    rows = {r.path: r for r in t.rows}
    assert rows[path].out_shapes[0] == (B, T, 32)
    declared = REGISTRIES[kind][name].flops(model.config, T)
    assert rows[path].flops == B * T * declared, (rows[path].flops, B * T * declared)
    x = torch.randn(B, T, 32)
    args = (x, torch.arange(T)) if kind == "position" else (x,)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        part(*args)
    assert counter.get_total_flops() <= B * T * declared
    if kind == "position" and POSITIONS[name].in_attention:  # it acts inside attention
        assert type(model.blocks[0].mixer.rope).__name__ != "Identity" \
            or model.blocks[0].mixer.alibi is not None


@pytest.mark.parametrize("kind, name, opts", PART_CASES, ids=PART_IDS)
def test_part_memory_is_within_10_percent_of_what_backward_keeps(kind, name, opts):
    """As for token mixers: the declared values per token against what one forward of the
    part saves for backward, at batch 8 and context 32 (a part that saves nothing declares
    0; a positional scheme's figure is its input part's), with one value per token of slack
    for the index tensors (positions) such a part keeps."""
    from minlm.memory import saved_values_per_token

    model = build(kind, name, opts).train()
    _, part = _part(model, kind)
    B, T = 8, 24  # the context: a learned table holds no more
    x = torch.randn(B, T, 32, requires_grad=True)
    args = (x, torch.arange(T)) if kind == "position" else (x,)
    measured = saved_values_per_token(part, *args)
    declared = REGISTRIES[kind][name].memory(model.config, T)
    assert abs(declared - measured) <= 0.1 * measured + 1, (declared, measured)


def test_modules_do_not_import_the_config():
    """config imports the registry to check names; no file of minlm/modules imports config
    back (anywhere, not only at the top), so neither can import half of the other."""
    import ast
    from pathlib import Path

    for path in (Path(__file__).parents[1] / "minlm" / "modules").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                assert not any(n.startswith("minlm.config") for n in names), path.name
                assert node.module != "minlm" or "config" not in [a.name for a in node.names]


@pytest.mark.parametrize("mixer, block_spec", [
    ("mlgru", "norm>mixer>+ norm>mlgru>+ norm>mlp>+"),         # two recurrences in one layer
    ("attention", "norm>mixer|attention>+ norm>mlp>+"),         # two attentions side by side
    ("mlgru", "norm>mixer>+ norm>attention>+ norm>mlp>+"),     # a recurrence and attention
    ("mamba", ["norm>griffin>+ norm>mlp>+", "norm>mixer>+", "norm>attention>+ norm>mlp>+"]),
])
def test_layouts_with_several_mixers_decode_like_the_full_forward(mixer, block_spec):
    """Each mixer of a layer keeps its own cache slot: sharing one, an attention layer and a
    recurrence (or two attentions) would overwrite each other's keys or state."""
    torch.manual_seed(0)
    cfg = ModelConfig.from_preset("llama-1m", vocab_size=64, block_size=24, dim=32, n_layers=3,
                                  n_heads=4, n_kv_heads=2, mixer=mixer, block_spec=block_spec,
                                  position="learned")
    model = LM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    prompt = torch.randint(0, 64, (2, 7))
    ref_ids, ref_logits = _stream(model, prompt, 20, use_cache=False)
    for kw in (dict(fast=True), dict(fast=False)):
        ids, logits = _stream(model, prompt, 20, **kw)
        assert (logits - ref_logits).abs().max().item() < CACHE_TOL, kw
        assert torch.equal(ids, ref_ids), kw


# --- fast forms against their references (generated from the registrations' ``forms``) -------

FORM_CASES = [(n, opt, form, extra) for n, s in MIXERS.items() for opt, forms in s.forms.items()
              for form in forms if form != "reference"
              for extra in [{}] + [{k: v} for k, v in s.examples.items() if k != opt]]
FORM_IDS = [f"{n}-{opt}={form}" + "".join(f"-{k}={v}" for k, v in extra.items())
            for n, opt, form, extra in FORM_CASES]


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Within 1e-5 of each other, relative to the larger of one and the values' size."""
    return (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item())


@pytest.mark.parametrize("name, opt, form, extra", FORM_CASES, ids=FORM_IDS)
def test_every_fast_form_equals_its_reference(name, opt, form, extra):
    """Each form a mixer declares (``forms=``) against its ``"reference"``, with each of the
    mixer's example options: logits and every parameter's gradient in training, and the
    state a cache carries into a second call (recurrent mixers), within 1e-5 in fp32."""
    fast_model = build("mixer", name, {**extra, opt: form}, perturb=True).train()
    ref_model = build("mixer", name, {**extra, opt: "reference"}).train()
    ref_model.load_state_dict(fast_model.state_dict())
    idx = torch.randint(0, 64, (3, 24))
    results = []
    for model in (fast_model, ref_model):
        logits, loss = model(idx, torch.roll(idx, -1, 1))
        loss.backward()
        grads = {k: p.grad for k, p in model.named_parameters() if p.grad is not None}
        results.append((logits.detach(), grads))
    (fast_logits, fast_grads), (ref_logits, ref_grads) = results
    assert ref_logits.abs().max() > 0.5  # the tolerance is small against the logits
    assert _close(fast_logits, ref_logits)
    assert fast_grads.keys() == ref_grads.keys() and fast_grads
    for k in ref_grads:
        assert _close(fast_grads[k], ref_grads[k]), k
    if MIXERS[name].state == "recurrent":  # a second call continues from the carried state
        from minlm.kvcache import KVCache

        outs = []
        for model in (fast_model, ref_model):
            cache = KVCache.for_model(model, 3)
            with torch.no_grad():
                model(idx[:, :10], cache=cache)
                outs.append(model(idx[:, 10:], positions=torch.arange(10, 24), cache=cache)[0])
        assert _close(*outs)


def test_forms_must_name_the_reference_and_the_default():
    from minlm.modules.registry import TokenMixer, register_mixer

    with pytest.raises(ValueError, match="forms of 'scan' must .* name 'reference'"):
        register_mixer("formless", options={"scan": "quick"}, forms={"scan": ("quick",)})(
            type("Formless", (TokenMixer,), {}))
    assert "formless" not in registry.mixers()
    with pytest.raises(ConfigErrorType, match=r"mixer_options scan='quick' is invalid for mamba: "
                                              r"must be one of 'chunked', 'reference'"):
        mixer_config("mamba", scan="quick")


def test_every_mixer_with_forms_is_reached_by_the_form_test():
    with_forms = {n for n, s in MIXERS.items() if s.forms}
    assert with_forms == {n for n, *_ in FORM_CASES}
    assert {"mamba", "griffin", "mlgru", "diffattn"} <= with_forms
