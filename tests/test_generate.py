"""Generation: the KV cache against full recomputation for every attention variant and the
MLGRU, left-padded batches against rows alone, sampling filters on hand-made distributions,
seeds, stop strings, streaming, chat history, and the generate/chat commands.

Tiny models throughout (dim 32, 2 layers) with weights moved off their init, so logits are
of order one and a 2e-5 tolerance (CACHE_TOL) means something.
"""

import math

import pytest
import torch

from minlm import LM, ModelConfig, TrainConfig
from minlm.cli import main
from minlm.generate import (
    Chat,
    TokenStream,
    apply_repetition_penalty,
    complete,
    filter_logits,
    generate,
    generate_batch,
    generate_batch_ids,
    generate_ids,
    sample_next,
    stream,
)
from minlm.kvcache import KVCache
from minlm.tokenizer import load_tokenizer

VARIANTS = {
    "mha-rope": dict(n_kv_heads=0),
    "gqa-rope": dict(n_kv_heads=2),
    "mqa-rope": dict(n_kv_heads=1),
    "alibi": dict(position="alibi"),
    "learned": dict(position="learned", norm="layernorm", norm_bias=True, activation="gelu",
                    attn_bias=True, mlp_bias=True),
    "no-position": dict(position="none"),
    "sliding-window": dict(window=5),
    "softcap-moe-mqa": dict(n_kv_heads=1, attn_softcap=30.0, n_experts=4, hidden_dim=32,
                            block_spec="norm>attn>norm>+ norm>mlp>norm>+", embed_scale=5.0),
    "qk-norm-logit-softcap": dict(qk_norm=True, logit_softcap=15.0),
    "mlgru": dict(mixer="mlgru", position="none"),
    "mlgru-learned": dict(mixer="mlgru", position="learned"),
}


pytestmark = pytest.mark.usefixtures("one_thread")
# cached decoding against recomputation: max |logit delta| measured by bench/numerics_spread.py
# across threads 1-3 and ATEN_CPU_CAPABILITY default / avx2 is 1.95e-6 (attention variants)
# and 3.04e-6 (every mixer); 2e-5 leaves 6.5x over the largest, against logits of order one
CACHE_TOL = 2e-5


def tiny(vocab_size: int = 64, block_size: int = 24, **overrides) -> LM:
    """A seeded tiny model whose weights are all moved off their init."""
    torch.manual_seed(0)
    base = dict(vocab_size=vocab_size, block_size=block_size, dim=32, n_layers=2, n_heads=4,
                n_kv_heads=2)
    cfg = ModelConfig.from_preset("llama-1m", **{**base, **overrides})
    model = LM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def run_stream(model, prompts, n, **kw):
    s = TokenStream(model, prompts, n, keep_logits=True, temperature=0, **kw)
    for _ in s:
        pass
    return s.new_tokens.clone(), torch.stack(s.logits)  # (B, n), (n, B, V)


@pytest.mark.numerics
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_cached_generation_equals_recomputation(variant):
    """Greedy tokens identical, logits within CACHE_TOL; 30 new tokens after a 7-token prompt also
    cross block_size (24), so the sliding context is checked too."""
    model = tiny(**VARIANTS[variant])
    prompt = torch.randint(0, 64, (2, 7))
    ref_ids, ref_logits = run_stream(model, prompt, 30, use_cache=False)
    paths = {"LM.step": dict(fast=True), "LM.forward": dict(fast=False)}
    for name, kw in paths.items():
        ids, logits = run_stream(model, prompt, 30, **kw)
        assert torch.equal(ids, ref_ids), (variant, name)
        assert (logits - ref_logits).abs().max().item() < CACHE_TOL, (variant, name)
    assert ref_logits.abs().max() > 0.5  # the tolerance is small against the logits


@pytest.mark.numerics
def test_fast_path_sees_norm_gains_and_weights_changed_after_decoding():
    """LM.step folds each RMSNorm's gain into the joined weights of the product after it; a
    gain or weight changed in place, or replaced, between generations (an optimizer step, a
    load_state_dict) must be seen, not the stale joined copy."""
    model = tiny()
    prompt = torch.randint(0, 64, (2, 7))
    run_stream(model, prompt, 5)  # builds the joined copies
    with torch.no_grad():
        model.blocks[0].norm1.weight.mul_(1.5)  # in place: its version counter moves
        model.blocks[1].norm2.weight.add_(0.3)
        model.norm.weight.mul_(-1.0)
        model.blocks[0].mixer.q_proj.weight.mul_(2.0)
    model.blocks[1].norm1.weight = torch.nn.Parameter(torch.rand(32) + 0.5)  # replaced
    ref_ids, ref_logits = run_stream(model, prompt, 5, use_cache=False)
    ids, logits = run_stream(model, prompt, 5)
    assert torch.equal(ids, ref_ids)
    assert (logits - ref_logits).abs().max().item() < CACHE_TOL


@pytest.mark.numerics
@pytest.mark.parametrize("variant", ["gqa-rope", "alibi", "learned", "sliding-window", "mlgru",
                                     "softcap-moe-mqa"])
@pytest.mark.parametrize("use_cache", [True, False])
def test_left_padded_batch_equals_each_prompt_alone(variant, use_cache):
    model = tiny(**VARIANTS[variant])
    prompts = [[1, 5, 9], [1, 7, 3, 30, 12, 8, 41, 2], [1], [1, 60, 61, 62, 63]]
    ids, logits = run_stream(model, prompts, 12, use_cache=use_cache)
    for r, p in enumerate(prompts):
        alone_ids, alone_logits = run_stream(model, [p], 12, use_cache=use_cache)
        assert ids[r].tolist() == alone_ids[0].tolist(), (variant, r)
        assert (logits[:, r] - alone_logits[:, 0]).abs().max().item() < CACHE_TOL, (variant, r)


def test_kv_cache_positions_and_padding():
    cache = KVCache(n_layers=1, batch_size=2, max_len=6)
    k = torch.randn(2, 1, 3, 4)
    k_all, v_all, k_pos, valid = cache.layer(0).update(k, k, torch.arange(3))
    assert k_all.shape == (2, 1, 3, 4) and valid is None and k_pos.tolist() == [0, 1, 2]
    cache.advance(3)
    pos = torch.tensor([[3], [1]])
    k_all, _, k_pos, valid = cache.layer(0).update(k[:, :, :1], k[:, :, :1], pos,
                                                   torch.tensor([[True], [False]]))
    assert k_pos.tolist() == [[0, 1, 2, 3], [0, 1, 2, 1]]
    assert valid.tolist() == [[True] * 4, [True, True, True, False]]
    cache.advance(1)
    with pytest.raises(ValueError, match="KV cache holds 6 tokens and is full"):
        cache.layer(0).update(k, k, torch.arange(4, 7))


def test_generate_ids_keeps_its_contract():
    model = tiny()
    idx = torch.randint(0, 64, (2, 5))
    out = generate_ids(model, idx, 8, temperature=0)
    assert out.shape == (2, 13) and torch.equal(out[:, :5], idx)
    assert torch.equal(out, generate_ids(model, idx, 8, temperature=0, use_cache=False))
    # a row stops at EOS and is filled with it; the batch stops when all rows have
    eos = out[0, 7].item()
    stopped = generate_ids(model, idx, 8, temperature=0, eos_id=eos)
    first = (out[0, 5:] == eos).nonzero()[0].item() + 5
    assert (stopped[0, first:] == eos).all()
    ids = generate_batch_ids(model, idx.tolist(), 8, eos_id=eos, temperature=0)
    assert ids[0] == out[0, 5:first].tolist()
    assert model.training is False


def test_model_mode_is_restored():
    model = tiny()
    model.train()
    generate_ids(model, torch.tensor([[1, 2]]), 3, temperature=0)
    assert model.training


# --- sampling -----------------------------------------------------------------------------

PROBS = torch.tensor([0.40, 0.30, 0.15, 0.10, 0.05])


def allowed(**kw) -> set[int]:
    logits = filter_logits(PROBS.log()[None], **kw)[0]
    return set(torch.isfinite(logits).nonzero().flatten().tolist())


def drawn(n: int = 3000, **kw) -> set[int]:
    logits = PROBS.log().expand(n, -1)
    gen = torch.Generator().manual_seed(0)
    return set(sample_next(logits, temperature=1.0, generator=gen, **kw).tolist())


@pytest.mark.parametrize("kw, expected", [
    (dict(top_k=2), {0, 1}),
    (dict(top_k=4), {0, 1, 2, 3}),
    (dict(top_p=0.4), {0}),  # the first token already reaches p
    (dict(top_p=0.6), {0, 1}),
    (dict(top_p=0.75), {0, 1, 2}),
    (dict(min_p=0.3), {0, 1, 2}),  # threshold 0.3 * 0.4 = 0.12
    (dict(min_p=0.5), {0, 1}),  # threshold 0.2
    (dict(top_k=3, top_p=0.5), {0, 1}),
    (dict(), {0, 1, 2, 3, 4}),
])
def test_filters_never_sample_outside_their_set(kw, expected):
    assert allowed(**kw) == expected
    assert drawn(**kw) == expected  # 3000 draws: every allowed token shows up, no other


def test_greedy_and_temperature():
    logits = torch.tensor([[0.1, 2.0, 1.9], [3.0, 0.0, -1.0]])
    assert sample_next(logits, temperature=0).tolist() == [1, 0]
    gen = torch.Generator().manual_seed(0)
    cold = sample_next(logits[:1].expand(500, -1), temperature=0.01, generator=gen)
    assert set(cold.tolist()) == {1}


def test_repetition_penalty_is_ctrl():
    logits = torch.tensor([[2.0, -2.0, 1.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    out = apply_repetition_penalty(logits, seen, 2.0)
    assert out.tolist() == [[1.0, -4.0, 1.0, -1.0]]
    # in generation: a strong penalty changes greedy output away from repeats
    model = tiny()
    plain = generate_ids(model, torch.tensor([[1, 2, 3]]), 20, temperature=0)[0, 3:].tolist()
    pen = generate_ids(model, torch.tensor([[1, 2, 3]]), 20, temperature=0,
                       repetition_penalty=50.0)[0, 3:].tolist()
    assert len(set(pen)) > len(set(plain))


def test_same_seed_same_tokens():
    model = tiny()
    idx = torch.tensor([[1, 2, 3]])
    kw = dict(temperature=1.0, top_p=0.95, min_p=0.02, top_k=40)
    a = generate_ids(model, idx, 30, seed=7, **kw)
    b = generate_ids(model, idx, 30, seed=7, **kw)
    c = generate_ids(model, idx, 30, seed=8, **kw)
    assert torch.equal(a, b) and not torch.equal(a, c)


@pytest.mark.parametrize("kw, match", [
    (dict(temperature=-1.0), "temperature=-1.0 is invalid"),
    (dict(top_p=0.0), "top_p=0.0 is invalid"),
    (dict(top_k=-3), "top_k=-3 is invalid"),
    (dict(min_p=1.5), "min_p=1.5 is invalid"),
    (dict(repetition_penalty=0.0), "repetition_penalty=0.0 is invalid"),
])
def test_bad_sampling_settings_are_refused(kw, match):
    with pytest.raises(ValueError, match=match):
        generate_ids(tiny(), torch.tensor([[1]]), 2, **kw)


def test_prompt_longer_than_the_context_is_refused():
    with pytest.raises(ValueError, match="the prompt is 25 tokens, longer than the context of 24"):
        TokenStream(tiny(), [[1] * 25], 4)
    with pytest.raises(ValueError, match="prompt 1 is 30 tokens, longer than the context of 24"):
        TokenStream(tiny(), [[1] * 3, [1] * 30], 4)


# --- text ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tinystories-512")


@pytest.fixture(scope="module")
def text_model():
    return tiny(vocab_size=512, block_size=64)


def test_stop_string_and_streaming(tok, text_model):
    full = generate(text_model, tok, "Once upon a time", 24, temperature=0)
    assert len(full) > 12
    stop = full[len(full) // 2:len(full) // 2 + 3]
    cut = generate(text_model, tok, "Once upon a time", 24, temperature=0, stop=stop)
    assert cut == full[:full.index(stop)]
    pieces = list(stream(text_model, tok, "Once upon a time", 24, temperature=0))
    assert len(pieces) > 1 and "".join(pieces) == full
    pieces = list(stream(text_model, tok, "Once upon a time", 24, temperature=0, stop=stop))
    assert "".join(pieces) == cut


def test_batch_of_texts_equals_each_alone(tok, text_model):
    prompts = ["Once upon a time", "The dog", "Lily and Tom went to the park to play"]
    batch = complete(text_model, tok, prompts, 16, temperature=0.8, top_k=50, seed=None)
    assert [c.finish for c in batch] and all(c.prompt_ids[0] == tok.bos_id for c in batch)
    greedy = generate_batch(text_model, tok, prompts, 16, temperature=0)
    assert greedy == [generate(text_model, tok, p, 16, temperature=0) for p in prompts]
    assert generate_batch(text_model, tok, prompts, 16, temperature=0.9, seed=3) == \
        generate_batch(text_model, tok, prompts, 16, temperature=0.9, seed=3)
    with pytest.raises(TypeError, match="list of prompts"):
        complete(text_model, tok, "one prompt", 4)


def test_chat_renders_turns_and_keeps_history_in_context(tok, text_model):
    chat = Chat(text_model, tok, system="Be kind.", max_new_tokens=8, temperature=0)
    t = tok.chat_tokens
    ids = chat.prompt_ids([("user", "hi")])
    assert ids == ([tok.bos_id, t["system"]] + tok.encode("Be kind.") + [t["end"], t["user"]]
                   + tok.encode("hi") + [t["end"], t["assistant"]])
    for i in range(8):
        reply = chat.reply(f"message number {i} about a big red ball")
        assert isinstance(reply, str)
    assert len(chat.history) == 16
    ids = chat.prompt_ids()
    assert len(ids) <= 64 - 8 and ids[:2] == [tok.bos_id, t["system"]]
    text = tok.decode(ids)
    assert "message number 7" in text and "message number 0" not in text
    with pytest.raises(ValueError, match="write a shorter one"):
        chat.prompt_ids([("user", "word " * 80)])


# --- the generate and chat commands -------------------------------------------------------

def make_run(run_dir, tokenizer, **overrides):
    """A run folder without training: configs, weights, tokenizer copy and a short log."""
    from minlm import runs

    model = tiny(vocab_size=tokenizer.vocab_size, block_size=64, **overrides)
    run_dir.mkdir(parents=True)
    runs.save_configs(run_dir, model.config, TrainConfig(preset="llama-1m"),
                      meta={"tokenizer_hash": tokenizer.hash, "params": model.num_params()})
    runs.save_weights(run_dir, model)
    runs.copy_tokenizer(run_dir, tokenizer)
    runs.write_log(run_dir, [{"step": s, "tokens": 1000 * s, "elapsed_s": 2.0 * s,
                              "train_loss": 5 - s / 10, "val_loss": 5 - s / 10,
                              "val_bpb": (5 - s / 10) / math.log(2) / 4} for s in (0, 5, 10)])
    return run_dir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tok):
    return make_run(tmp_path_factory.mktemp("runs") / "tiny-run", tok)


def test_cli_generate(run_dir, tok, capsys):
    assert main(["generate", str(run_dir), "Once upon a time", "The cat", "--temperature", "0",
                 "--max-new-tokens", "12", "--min-p", "0.05"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Once upon a time") and "\n" + "-" * 40 + "\nThe cat" in out
    assert main(["generate", str(run_dir), "Once upon a time", "--temperature", "0",
                 "--max-new-tokens", "12"]) == 0
    streamed = capsys.readouterr().out
    assert streamed == out.split("\n" + "-" * 40)[0] + "\n"  # streaming prints the same text
    assert main(["generate", str(run_dir), "Once upon", "--temperature", "0", "--show-tokens",
                 "--max-new-tokens", "5"]) == 0
    shown = capsys.readouterr().out
    assert shown.startswith(str(tok.display("Once upon"))) and shown.count("][") >= 6
    assert main(["generate", str(run_dir), "Hi", "--top-p", "2"]) == 2
    assert "top_p=2.0 is invalid" in capsys.readouterr().err


def test_cli_chat_reads_stdin_until_quit(run_dir, capsys, monkeypatch):
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO("hello there\n\nhow are you?\n/quit\nignored\n"))
    assert main(["chat", str(run_dir), "--max-new-tokens", "6", "--temperature", "0"]) == 0
    out = capsys.readouterr().out
    assert out.count("assistant> ") == 2
    monkeypatch.setattr("sys.stdin", io.StringIO("hello\n"))  # end of input also ends
    assert main(["chat", str(run_dir), "--max-new-tokens", "4", "--seed", "1"]) == 0
