"""Tokenizers: exact round trips on real text, special ids, hashes, loading every format."""

from __future__ import annotations

import hashlib
import itertools

import pytest

from minlm.data import read_documents
from minlm.tokenizer import (
    ByteTokenizer,
    CharTokenizer,
    HFTokenizer,
    SentencePieceTokenizer,
    load_tokenizer,
    shipped_tokenizer_path,
)

SIZES = [512, 1024, 2048, 4096, 8192]
HARD = [
    "Grüße aus Köln! Ça va? ñandú",
    "emoji 😀🎉👩‍👩‍👧 and CJK 你好世界, こんにちは, 안녕하세요",
    "  two  spaces,\ttabs\t and\n\nblank lines\n",
    "digits 0123456789 3.14159 and symbols ~`@#$%^&*()_+{}|<>[]\\",
    "",
]


@pytest.fixture(scope="module")
def stories(shared_data):
    return list(itertools.islice(read_documents(shared_data / "tinystories" / "valid.txt"), 12))


@pytest.fixture(scope="module")
def small_sp(shared_data, tmp_path_factory):
    """A throwaway sentencepiece model trained on 300 stories (well under a second)."""
    docs = itertools.islice(read_documents(shared_data / "tinystories" / "train.txt"), 300)
    corpus = tmp_path_factory.mktemp("corpus") / "excerpt.txt"
    corpus.write_text("\n<|endoftext|>\n".join(docs) + "\n")
    return SentencePieceTokenizer.train([corpus], vocab_size=400,
                                        out_path=corpus.with_suffix(".model"))


@pytest.fixture(scope="module", params=SIZES)
def shipped(request):
    return load_tokenizer(f"tinystories-{request.param}")


def test_shipped_round_trip_real_and_unicode(shipped, stories):
    assert shipped.vocab_size == int(shipped.path.stem.split("-")[1])
    for text in stories + HARD:
        assert shipped.decode(shipped.encode(text)) == text
    assert shipped.decode_batch(shipped.encode_batch(stories, bos=True, eos=True)) == stories
    assert shipped.encode_batch(stories[:3]) == [shipped.encode(s) for s in stories[:3]]


def test_trained_in_test_round_trips(small_sp, stories):
    assert small_sp.vocab_size == 400
    for text in stories + HARD:
        assert small_sp.decode(small_sp.encode(text)) == text
    assert load_tokenizer(small_sp.path).hash == small_sp.hash


def test_special_ids_and_chat_tokens(shipped):
    assert (shipped.pad_id, shipped.bos_id, shipped.eos_id) == (0, 2, 3)
    ids = shipped.encode("hi", bos=True, eos=True)
    assert ids[0] == shipped.bos_id and ids[-1] == shipped.eos_id
    assert shipped.decode([shipped.pad_id] + ids + [shipped.pad_id]) == "hi"
    chat = shipped.chat_tokens
    assert set(chat) == {"system", "user", "assistant", "end"}
    assert len(set(chat.values()) | {shipped.pad_id, shipped.bos_id, shipped.eos_id}) == 7
    for role, piece in [("system", "<|system|>"), ("user", "<|user|>"),
                        ("assistant", "<|assistant|>"), ("end", "<|end|>")]:
        assert shipped.encode(piece) == [chat[role]]
        assert shipped.id_to_piece(chat[role]) == piece
        assert shipped.special_tokens[piece] == chat[role]
    text = "<|user|>Tell me a story.<|end|><|assistant|>Once upon a time<|end|>"
    ids = shipped.encode(text)
    assert ids.count(chat["end"]) == 2 and shipped.decode(ids) == text


def test_hash_is_sha256_of_saved_file_and_survives_reload(tmp_path):
    tok = load_tokenizer("tinystories-1024")
    assert tok.hash == hashlib.sha256(shipped_tokenizer_path(1024).read_bytes()).hexdigest()
    copy = tok.save(tmp_path / "copy.model")
    again = load_tokenizer(copy)
    assert again.hash == tok.hash and again.encode("Once upon") == tok.encode("Once upon")


def test_display_shows_pieces():
    tok = load_tokenizer("tinystories-2048")
    shown = tok.display("Once upon a time")
    assert str(shown) == "[Once][ upon][ a][ time]"
    html = shown._repr_html_()
    assert html.count("<span") == 4 and "upon" in html
    assert "[<0xF0>]" in str(tok.display("😀"))  # byte fallback pieces are named, not garbled
    assert str(tok.display(tok.encode("hi", bos=True))).startswith("[<s>]")


def test_missing_and_bad_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"nope\.model.*tinystories-2048"):
        load_tokenizer(tmp_path / "nope.model")
    with pytest.raises(ValueError, match=r"vocab_size=123.*\[512, 1024, 2048, 4096, 8192\]"):
        shipped_tokenizer_path(123)
    garbage = tmp_path / "garbage.model"
    garbage.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="garbage.model is not a sentencepiece model"):
        load_tokenizer(garbage)
    with pytest.raises(ValueError, match=r"token id 5000 is out of range.*0\.\.2047"):
        load_tokenizer("tinystories-2048").decode([5000])
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        SentencePieceTokenizer.train([garbage], vocab_size=100)


@pytest.mark.parametrize("name", ["byte.json", "tokenizer.json"])  # run folders use tokenizer.json
def test_byte_tokenizer(tmp_path, stories, name):
    tok = ByteTokenizer()
    assert tok.vocab_size == 256 + len(tok.special_tokens)
    for text in stories[:3] + HARD:
        assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
    assert len(tok.encode("héllo")) == len("héllo".encode())
    assert tok.encode("<|user|>") == [tok.chat_tokens["user"]]
    again = load_tokenizer(tok.save(tmp_path / name))
    assert isinstance(again, ByteTokenizer) and again.hash == tok.hash
    assert str(again.display("ab")) == "[a][b]"


def test_char_tokenizer(tmp_path, shared_data, stories):
    tok = CharTokenizer.build([shared_data / "tinystories" / "valid.txt"])
    assert 60 < len(tok.chars) < 120
    for text in stories:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<|assistant|>") == [tok.chat_tokens["assistant"]]
    assert tok.encode("a你") == [tok.encode("a")[0], tok.unk_id]
    again = load_tokenizer(tok.save(tmp_path / "chars.json"))
    assert isinstance(again, CharTokenizer) and again.hash == tok.hash
    assert again.encode(stories[0]) == tok.encode(stories[0])
    assert CharTokenizer.build("abca").chars == ["a", "b", "c"]


@pytest.fixture(scope="module")
def hf_tk(stories):
    """A byte-level BPE trained with the Hugging Face library on a few stories."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(stories, trainer)
    return tk


def test_hf_tokenizer_json(tmp_path, hf_tk, stories):
    hf_tk.save(str(tmp_path / "tokenizer.json"))
    for where in (tmp_path / "tokenizer.json", tmp_path):
        tok = load_tokenizer(where)
        assert isinstance(tok, HFTokenizer)
        for text in stories + HARD:
            assert tok.decode(tok.encode(text, bos=True, eos=True)) == text
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
        assert tok.encode("<|user|>") == [tok.chat_tokens["user"]]
    again = load_tokenizer(tok.save(tmp_path / "copy" / "tokenizer.json"))
    assert again.hash == tok.hash


def test_hf_vocab_and_merges(tmp_path, hf_tk, stories):
    hf_tk.model.save(str(tmp_path))  # writes vocab.json + merges.txt (GPT-2 layout)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    for text in stories[:4] + HARD:
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("<s>") == [tok.bos_id]


def test_hf_missing_special_token_is_a_clear_error(tmp_path):
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "tokenizer.json"))
    tok = load_tokenizer(tmp_path / "tokenizer.json")
    with pytest.raises(ValueError, match=r"no bos token; looked for \['<s>'"):
        _ = tok.bos_id
    assert tok.decode([]) == ""  # decoding needs no special tokens


def test_char_build_rejects_a_path_given_as_str(shared_data):
    with pytest.raises(ValueError, match="is a file path.*Path"):
        CharTokenizer.build(str(shared_data / "shakespeare" / "input.txt"))
