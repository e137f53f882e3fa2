"""Tokenizers: text <-> ids, with one interface over sentencepiece, bytes, characters and HF files.

Every tokenizer has ``bos_id``/``eos_id``/``pad_id``, the chat tokens ``<|system|>``,
``<|user|>``, ``<|assistant|>``, ``<|end|>`` (reserved now so chat fine-tuning needs no new
embeddings later), a content ``hash`` that a run records, and ``display()`` to see the pieces.

    tok = load_tokenizer("tinystories-2048")      # a shipped model, by name
    tok.encode("Once upon a time", bos=True)      # -> [2, ...]
    tok.display("Once upon a time")               # [Once][ upon][ a][ time]

Build the shipped models with ``python -m minlm tokenizer train ...`` (or ``python -m
minlm.tokenizer train ...``; see tokenizers/README.md).
"""

from __future__ import annotations

import argparse
import hashlib
import html
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path

from minlm.errors import report_errors
from minlm.fileio import atomic_write_bytes


def _shipped_dir() -> Path:
    """The shipped tokenizers: the checkout's ``tokenizers/`` (an editable install), else the
    copy a wheel installs under ``<prefix>/share/minlm/tokenizers`` (``pip install .``)."""
    import sys

    checkout = Path(__file__).resolve().parents[1] / "tokenizers"  # site-packages/tokenizers
    installed = Path(sys.prefix) / "share" / "minlm" / "tokenizers"  # is Hugging Face's package
    has_models = any(checkout.glob("*.model"))
    return checkout if has_models or not installed.is_dir() else installed


SHIPPED_DIR = _shipped_dir()
CHAT_TOKENS = {"system": "<|system|>", "user": "<|user|>", "assistant": "<|assistant|>",
               "end": "<|end|>"}
N_RESERVED = 4  # spare special tokens (<|reserved_0|> ...) for later uses, at no retraining cost
RESERVED_TOKENS = [f"<|reserved_{i}|>" for i in range(N_RESERVED)]
_ASCII = "".join(map(chr, range(33, 127)))  # always whole pieces, however rare (digits)
BYTE_PIECE = re.compile(r"^<0x[0-9A-F]{2}>$")


class Tokenizer:
    """The interface the rest of minlm uses; subclasses fill in the ``_``-prefixed methods."""

    path: Path | None = None  # the file it was loaded from or last saved to
    bos_id: int
    eos_id: int
    pad_id: int
    special_tokens: dict[str, int]  # piece string -> id, for every special/control token

    # --- what a subclass provides -------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        raise NotImplementedError

    def _encode(self, text: str) -> list[int]:
        """Ids of ``text`` without bos/eos; chat token strings must map to their single ids."""
        raise NotImplementedError

    def _decode(self, ids: list[int]) -> str:
        """Text of ``ids``, which hold no pad/bos/eos (decode() removes them first)."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        """The saved form; ``from_bytes(to_bytes())`` rebuilds the same tokenizer."""
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        raise NotImplementedError

    # --- shared behaviour ---------------------------------------------------------------
    @property
    def chat_tokens(self) -> dict[str, int]:
        """``{"system", "user", "assistant", "end"}`` -> id of ``<|system|>`` etc."""
        missing = [s for s in CHAT_TOKENS.values() if s not in self.special_tokens]
        if missing:
            raise ValueError(f"tokenizer {self.path or type(self).__name__} has no chat tokens "
                             f"{missing}; use a minlm-trained tokenizer, which reserves them")
        return {role: self.special_tokens[s] for role, s in CHAT_TOKENS.items()}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        if not isinstance(text, str):
            raise TypeError(f"encode() takes a str, got {type(text).__name__}; "
                            "use encode_batch() for a list of texts")
        check_text(text)
        return [self.bos_id] * bos + self._encode(text) + [self.eos_id] * eos

    def encode_batch(self, texts: Iterable[str], bos: bool = False,
                     eos: bool = False) -> list[list[int]]:
        return [self.encode(t, bos=bos, eos=eos) for t in texts]

    def decode(self, ids: Iterable[int]) -> str:
        """Text of ``ids``; pad/bos/eos are dropped, chat tokens render as their strings."""
        ids = [int(i) for i in ids]
        self._check_ids(ids)
        skip = self._skipped_ids()
        return self._decode([i for i in ids if i not in skip])

    def _skipped_ids(self) -> set[int]:
        return {self.pad_id, self.bos_id, self.eos_id}

    def decode_batch(self, batch: Iterable[Iterable[int]]) -> list[str]:
        return [self.decode(ids) for ids in batch]

    def _check_ids(self, ids: list[int]) -> None:
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:
            raise ValueError(f"token id {bad[0]} is out of range for this tokenizer "
                             f"(valid ids: 0..{self.vocab_size - 1})")

    @property
    def hash(self) -> str:
        """sha256 of the saved content: the same after save -> load, recorded by every run."""
        return hashlib.sha256(self.to_bytes()).hexdigest()

    def save(self, path: str | os.PathLike) -> Path:
        """Write the tokenizer atomically; ``load_tokenizer(path)`` reads it back."""
        path = Path(path)
        atomic_write_bytes(path, self.to_bytes())
        self.path = path
        return path

    def piece_text(self, i: int) -> str:
        """What one token shows as in ``display()``: its text, or its piece name when it has
        none on its own (specials, a lone byte of a multi-byte character)."""
        if i in self.special_tokens.values():
            return self.id_to_piece(i)
        text = self._decode([i])
        return self.id_to_piece(i) if (not text or "\ufffd" in text) else text

    def display(self, text_or_ids: str | Sequence[int]) -> TokenDisplay:
        """How text splits into tokens: print it (``[Once][ upon]``) or show it in a notebook."""
        ids = self.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        return TokenDisplay(ids, [self.piece_text(i) for i in ids])

    def __repr__(self) -> str:
        where = f", path={str(self.path)!r}" if self.path else ""
        return f"{type(self).__name__}(vocab_size={self.vocab_size}{where})"


_COLOURS = ["#fde2e4", "#e2ece9", "#dfe7fd", "#fff1c1", "#e8dff5", "#d3f8e2", "#fce1c8"]


def check_text(text: str, what: str = "the text") -> None:
    """Refuse text that is not valid Unicode: bytes that were not UTF-8 (a prompt from the
    shell, a line on stdin) arrive as lone surrogates, which the tokenizers' C++ code
    rejects with a bare cast error."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"{what} is not valid UTF-8 (undecodable bytes at character {e.start}: "
                         f"{text[e.start:e.end]!r}); give it as UTF-8 text") from None


class TokenDisplay:
    """Tokens of a text: ``str()`` brackets each piece, ``_repr_html_`` colours them."""

    def __init__(self, ids: list[int], pieces: list[str]):
        self.ids, self.pieces = ids, pieces

    def __len__(self) -> int:
        return len(self.ids)

    def __str__(self) -> str:
        return "".join(f"[{p}]" for p in self.pieces).replace("\n", "\\n")

    __repr__ = __str__

    def _repr_html_(self) -> str:
        spans = []
        for k, (ids, p) in enumerate(self._grouped()):
            shown = html.escape(p).replace("\n", "↵<br>")
            title = f"id {ids[0]}" if len(ids) == 1 else (
                f"{len(ids)} byte tokens, ids {' '.join(map(str, ids))}")
            spans.append(f'<span title="{title}" style="background:'
                         f'{_COLOURS[k % len(_COLOURS)]};border-radius:3px;padding:0 1px">'
                         f'{shown}</span>')
        return ('<div style="font-family:monospace;white-space:pre-wrap;line-height:1.8">'
                + "".join(spans) + f"</div><small>{len(self.ids)} tokens</small>")


    def _grouped(self) -> list[tuple[list[int], str]]:
        """(ids, text) spans: a run of byte-fallback pieces (``<0xF0><0x9F>...``) becomes the
        characters its bytes spell, so an emoji reads as itself, with its ids in the title."""
        out: list[tuple[list[int], str]] = []
        run_ids: list[int] = []
        run_bytes = bytearray()
        for i, p in [*zip(self.ids, self.pieces), (None, "")]:
            m = _BYTE_PIECE.fullmatch(p)
            if m:
                run_ids.append(i)
                run_bytes.append(int(m.group(1), 16))
                continue
            if run_ids:
                out.append((run_ids, bytes(run_bytes).decode("utf-8", errors="replace")))
                run_ids, run_bytes = [], bytearray()
            if i is not None:
                out.append(([i], p))
        return out


_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _split_specials(text: str, specials: dict[str, int]) -> list[str | int]:
    """Cut ``text`` at special-token strings: plain text parts and the specials' ids."""
    if not specials:
        return [text]
    pattern = "(" + "|".join(re.escape(s) for s in sorted(specials, key=len, reverse=True)) + ")"
    return [specials.get(part, part) for part in re.split(pattern, text) if part]


# ---------------------------------------------------------------------------------------
# sentencepiece
# ---------------------------------------------------------------------------------------

class SentencePieceTokenizer(Tokenizer):
    """A sentencepiece model (BPE or unigram) with byte fallback: any text round-trips."""

    def __init__(self, model_proto: bytes, path: Path | None = None):
        import sentencepiece as spm

        self._proto = bytes(model_proto)
        self.sp = spm.SentencePieceProcessor(model_proto=self._proto)
        self.path = path
        self.bos_id, self.eos_id, self.pad_id = self.sp.bos_id(), self.sp.eos_id(), self.sp.pad_id()
        for name, i in (("bos", self.bos_id), ("eos", self.eos_id), ("pad", self.pad_id)):
            if i < 0:
                raise ValueError(f"sentencepiece model {path or ''} has no {name} token; train it "
                                 f"with SentencePieceTokenizer.train (which sets {name}_id)")
        self.special_tokens = {self.sp.id_to_piece(i): i for i in range(self.sp.get_piece_size())
                               if self.sp.is_control(i) or self.sp.is_unknown(i)}
        for piece in (*CHAT_TOKENS.values(), *RESERVED_TOKENS):  # user-defined symbols
            i = self.sp.piece_to_id(piece)
            if self.sp.id_to_piece(i) == piece:
                self.special_tokens[piece] = i

    @classmethod
    def load(cls, path: str | os.PathLike) -> SentencePieceTokenizer:
        path = Path(path)
        try:
            return cls(path.read_bytes(), path)
        except RuntimeError as e:  # sentencepiece's parse error names neither file nor cause
            raise ValueError(f"{path} is not a sentencepiece model file: {e}") from e

    @classmethod
    def from_bytes(cls, data: bytes) -> SentencePieceTokenizer:
        return cls(data)

    def to_bytes(self) -> bytes:
        return self._proto

    @property
    def vocab_size(self) -> int:
        return self.sp.get_piece_size()

    def _encode(self, text: str) -> list[int]:
        return self.sp.encode(text)  # user-defined symbols (chat tokens) match as one id

    def encode_batch(self, texts, bos=False, eos=False):
        return self.sp.encode(list(texts), add_bos=bos, add_eos=eos)  # threaded inside

    def _decode(self, ids: list[int]) -> str:
        return self.sp.decode(ids)

    def id_to_piece(self, i: int) -> str:
        self._check_ids([int(i)])
        return self.sp.id_to_piece(int(i))

    def piece_text(self, i: int) -> str:
        piece = self.id_to_piece(i)
        return piece if BYTE_PIECE.match(piece) else super().piece_text(i)

    @classmethod
    def train(cls, text_files: str | os.PathLike | Sequence[str | os.PathLike], vocab_size: int,
              model_type: str = "bpe", out_path: str | os.PathLike | None = None,
              **opts) -> SentencePieceTokenizer:
        """Train on the documents of ``text_files`` (any format ``minlm.data.read_documents``
        reads; ``<|endoftext|>`` separator lines are not part of any document).

        Settings follow llama2.c: byte fallback (no unknown tokens), digits split, identity
        normalisation with no dummy prefix so ``decode(encode(x)) == x``. ``opts`` override
        any sentencepiece trainer option, e.g. ``input_sentence_size`` (documents sampled).
        """
        import sentencepiece as spm

        from minlm.data import read_documents  # lazy: minlm.data imports torch

        files = [Path(text_files)] if isinstance(text_files, (str, os.PathLike)) else [
            Path(f) for f in text_files]
        if not files:
            raise ValueError("text_files is empty; give at least one text file to train on")
        if model_type not in ("bpe", "unigram"):
            raise ValueError(f"model_type={model_type!r} is not supported; use 'bpe' or 'unigram'")
        n_fixed = 4 + len(CHAT_TOKENS) + N_RESERVED + 256
        if vocab_size <= n_fixed:
            raise ValueError(f"vocab_size={vocab_size} is too small: the special tokens and 256 "
                             f"byte pieces take {n_fixed}; use at least {n_fixed + 64}")

        def documents():
            for f in files:
                yield from read_documents(f)

        writer = io.BytesIO()
        settings = {
            "sentence_iterator": documents(), "model_writer": writer, "vocab_size": vocab_size,
            "model_type": model_type, "byte_fallback": True, "split_digits": True,
            "normalization_rule_name": "identity", "add_dummy_prefix": False,
            "remove_extra_whitespaces": False, "allow_whitespace_only_pieces": True,
            "character_coverage": 0.9995, "required_chars": _ASCII,
            "max_sentence_length": 1 << 16, "input_sentence_size": 20_000,
            "shuffle_input_sentence": True, "pad_id": 0, "unk_id": 1, "bos_id": 2, "eos_id": 3,
            "user_defined_symbols": list(CHAT_TOKENS.values()) + RESERVED_TOKENS,
            "num_threads": os.cpu_count() or 1, "minloglevel": 2,
        }
        settings.update(opts)
        try:
            spm.SentencePieceTrainer.train(**settings)
        except RuntimeError as e:
            raise ValueError(f"sentencepiece could not train vocab_size={vocab_size} on "
                             f"{[str(f) for f in files]}: {e}") from e
        tok = cls(writer.getvalue())
        if out_path is not None:
            tok.save(out_path)
        return tok


# ---------------------------------------------------------------------------------------
# bytes and characters: no training, tiny JSON files
# ---------------------------------------------------------------------------------------

_BASE_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]


class _TableTokenizer(Tokenizer):
    """Shared by Byte/CharTokenizer: specials first, then one id per byte or character."""

    kind = ""

    def __init__(self, specials: list[str]):
        self._specials = specials
        self.special_tokens = {s: i for i, s in enumerate(specials)}
        self.pad_id, self.unk_id, self.bos_id, self.eos_id = range(4)
        self._matchable = {s: i for s, i in self.special_tokens.items() if s not in _BASE_SPECIALS}

    def _encode(self, text: str) -> list[int]:
        out: list[int] = []
        for part in _split_specials(text, self._matchable):
            out.extend([part] if isinstance(part, int) else self._encode_plain(part))
        return out

    def _payload(self) -> dict:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        data = {"minlm_tokenizer": self.kind, "specials": self._specials, **self._payload()}
        return (json.dumps(data, ensure_ascii=False, indent=1) + "\n").encode("utf-8")

    @classmethod
    def from_bytes(cls, data: bytes) -> Tokenizer:
        obj = json.loads(data)
        kind = obj.get("minlm_tokenizer")
        if kind not in _TABLE_KINDS:
            raise ValueError(f"not a minlm tokenizer JSON (minlm_tokenizer={kind!r}; "
                             f"expected one of {sorted(_TABLE_KINDS)})")
        return _TABLE_KINDS[kind]._from_obj(obj)

    @classmethod
    def load(cls, path: str | os.PathLike) -> Tokenizer:
        tok = cls.from_bytes(Path(path).read_bytes())
        tok.path = Path(path)
        return tok


class ByteTokenizer(_TableTokenizer):
    """UTF-8 bytes as tokens: the specials take the first ids, then byte ``b`` is id
    ``len(specials) + b``. Needs no training and takes any text, at ~4x the sequence length."""

    kind = "byte"

    def __init__(self, specials: list[str] | None = None):
        super().__init__(specials or _BASE_SPECIALS + list(CHAT_TOKENS.values()))
        self._offset = len(self._specials)

    @classmethod
    def _from_obj(cls, obj: dict) -> ByteTokenizer:
        return cls(obj["specials"])

    def _payload(self) -> dict:
        return {}

    @property
    def vocab_size(self) -> int:
        return self._offset + 256

    def _encode_plain(self, text: str) -> list[int]:
        return [self._offset + b for b in text.encode("utf-8")]

    def _decode(self, ids: list[int]) -> str:
        out, buf = [], bytearray()
        for i in ids:
            if i >= self._offset:
                buf.append(i - self._offset)
                continue
            out.append(buf.decode("utf-8", errors="replace"))
            buf = bytearray()
            out.append("\ufffd" if i == self.unk_id else self._specials[i])
        out.append(buf.decode("utf-8", errors="replace"))
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        self._check_ids([int(i)])
        if i < self._offset:
            return self._specials[i]
        b = i - self._offset
        return chr(b) if 32 <= b < 127 else f"<0x{b:02X}>"


class CharTokenizer(_TableTokenizer):
    """One token per character of the corpus (99 in the TinyStories train.txt); others -> unk."""

    kind = "char"

    def __init__(self, chars: Sequence[str], specials: list[str] | None = None):
        super().__init__(specials or _BASE_SPECIALS + list(CHAT_TOKENS.values()))
        self.chars = list(chars)
        offset = len(self._specials)
        self._stoi = {c: offset + k for k, c in enumerate(self.chars)}

    @classmethod
    def build(cls, text_or_files: str | os.PathLike | Iterable[str | os.PathLike]) -> CharTokenizer:
        """From a text (a ``str``) or from files (a Path, or a list of paths) read as documents."""
        from minlm.data import read_documents  # lazy: minlm.data imports torch

        if isinstance(text_or_files, str):
            maybe_path = len(text_or_files) < 1024 and "\n" not in text_or_files
            if maybe_path and Path(text_or_files).is_file():
                raise ValueError(f"CharTokenizer.build got the str {text_or_files!r}, which is a "
                                 "file path; a str is the corpus text itself. Pass "
                                 "Path(...) or [path] to read the file")
            texts: Iterable[str] = [text_or_files]
        else:
            files = [text_or_files] if isinstance(text_or_files, os.PathLike) else text_or_files
            texts = (doc for f in files for doc in read_documents(f))
        chars: set[str] = set()
        for t in texts:
            chars.update(t)
        if not chars:
            raise ValueError("CharTokenizer.build got no characters; give a non-empty text")
        return cls(sorted(chars))

    @classmethod
    def _from_obj(cls, obj: dict) -> CharTokenizer:
        return cls(obj["chars"], obj["specials"])

    def _payload(self) -> dict:
        return {"chars": self.chars}

    @property
    def vocab_size(self) -> int:
        return len(self._specials) + len(self.chars)

    def _encode_plain(self, text: str) -> list[int]:
        return [self._stoi.get(c, self.unk_id) for c in text]

    def _decode(self, ids: list[int]) -> str:
        n = len(self._specials)
        return "".join(self.chars[i - n] if i >= n else
                       ("\ufffd" if i == self.unk_id else self._specials[i]) for i in ids)

    def id_to_piece(self, i: int) -> str:
        self._check_ids([int(i)])
        n = len(self._specials)
        return self.chars[i - n] if i >= n else self._specials[i]


_TABLE_KINDS: dict[str, type[_TableTokenizer]] = {"byte": ByteTokenizer, "char": CharTokenizer}


# ---------------------------------------------------------------------------------------
# Hugging Face tokenizers
# ---------------------------------------------------------------------------------------

_BOS_NAMES = ["<s>", "<|bos|>", "<bos>", "<|begin_of_text|>", "<|startoftext|>", "[CLS]",
              "<|endoftext|>"]
_EOS_NAMES = ["</s>", "<|eos|>", "<eos>", "<|end_of_text|>", "<|endoftext|>", "[SEP]"]
_PAD_NAMES = ["<pad>", "<|pad|>", "[PAD]", "<|padding|>"]


class HFTokenizer(Tokenizer):
    """A Hugging Face ``tokenizers`` model: a ``tokenizer.json``, or GPT-2 style
    ``vocab.json`` + ``merges.txt`` (byte-level BPE). Special ids are found by common names."""

    def __init__(self, tk, path: Path | None = None):
        self.tk, self.path = tk, path
        vocab = tk.get_vocab(with_added_tokens=True)
        self._ids = {name: vocab[name] for name in {*_BOS_NAMES, *_EOS_NAMES, *_PAD_NAMES,
                                                    *CHAT_TOKENS.values()} if name in vocab}
        self.special_tokens = {t.content: i for i, t in tk.get_added_tokens_decoder().items()
                               if t.special}
        self.special_tokens.update({n: i for n, i in self._ids.items()})

    def _find(self, names: list[str], what: str) -> int:
        for n in names:
            if n in self._ids:
                return self._ids[n]
        raise ValueError(f"HF tokenizer {self.path or ''} has no {what} token; looked for "
                         f"{names}. Add one to the tokenizer, or use a minlm tokenizer")

    bos_id = property(lambda self: self._find(_BOS_NAMES, "bos"))
    eos_id = property(lambda self: self._find(_EOS_NAMES, "eos"))
    @property
    def pad_id(self) -> int:
        """The pad token, or EOS where there is none (GPT-2 style files): pads are masked
        wherever they are used, and a row that emits EOS has ended anyway."""
        found = [self._ids[n] for n in _PAD_NAMES if n in self._ids]
        return found[0] if found else self.eos_id

    def _skipped_ids(self) -> set[int]:  # GPT-2 style files have no pad; decode still works
        return {self._ids[n] for n in (*_BOS_NAMES, *_EOS_NAMES, *_PAD_NAMES) if n in self._ids}

    @classmethod
    def load(cls, path: str | os.PathLike) -> HFTokenizer:
        """``path``: a ``tokenizer.json``, a ``vocab.json`` with ``merges.txt`` beside it, or a
        folder holding either."""
        from tokenizers import Tokenizer as TK

        path = Path(path)
        folder = path if path.is_dir() else path.parent
        if path.is_dir() and (path / "tokenizer.json").exists():
            path = path / "tokenizer.json"
        if path.is_file() and path.name != "vocab.json":
            try:
                return cls(TK.from_file(str(path)), path)
            except Exception as e:  # the Rust error says only "expected value at line 1"
                raise ValueError(f"{path} is not a Hugging Face tokenizer.json: {e}") from e
        vocab, merges = folder / "vocab.json", folder / "merges.txt"
        if not (vocab.exists() and merges.exists()):
            raise FileNotFoundError(f"{path}: expected a tokenizer.json, or vocab.json and "
                                    f"merges.txt in {folder}")
        return cls(_bpe_from_vocab_merges(vocab, merges), folder)

    @classmethod
    def from_bytes(cls, data: bytes) -> HFTokenizer:
        from tokenizers import Tokenizer as TK

        return cls(TK.from_str(data.decode("utf-8")))

    def to_bytes(self) -> bytes:
        return self.tk.to_str().encode("utf-8")

    @property
    def vocab_size(self) -> int:
        return self.tk.get_vocab_size(with_added_tokens=True)

    def _encode(self, text: str) -> list[int]:
        return self.tk.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts, bos=False, eos=False):
        enc = self.tk.encode_batch(list(texts), add_special_tokens=False)  # threaded inside
        return [[self.bos_id] * bos + e.ids + [self.eos_id] * eos for e in enc]

    def _decode(self, ids: list[int]) -> str:
        return self.tk.decode(ids, skip_special_tokens=False)

    def id_to_piece(self, i: int) -> str:
        self._check_ids([int(i)])
        return self.tk.id_to_token(int(i))


def _bpe_from_vocab_merges(vocab: Path, merges: Path):
    """GPT-2 layout: byte-level BPE; tokens of the vocab with special names become specials."""
    from tokenizers import AddedToken, decoders, models, pre_tokenizers
    from tokenizers import Tokenizer as TK

    tk = TK(models.BPE.from_file(str(vocab), str(merges)))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    names = {*_BOS_NAMES, *_EOS_NAMES, *_PAD_NAMES, *CHAT_TOKENS.values()}
    present = [n for n in tk.get_vocab() if n in names]
    tk.add_special_tokens([AddedToken(n, special=True) for n in sorted(present)])
    return tk


# ---------------------------------------------------------------------------------------
# loading by path or by shipped name
# ---------------------------------------------------------------------------------------

def shipped_tokenizers() -> dict[str, Path]:
    """Name -> path of the tokenizers in the repo's ``tokenizers/`` folder."""
    return {p.stem: p for p in sorted(SHIPPED_DIR.glob("*.model"))}


def shipped_tokenizer_path(vocab_size: int) -> Path:
    """The shipped TinyStories tokenizer with ``vocab_size`` tokens."""
    path = SHIPPED_DIR / f"tinystories-{vocab_size}.model"
    if not path.exists():
        sizes = sorted(int(n.rsplit("-", 1)[1]) for n in shipped_tokenizers()
                       if n.startswith("tinystories-"))
        raise ValueError(f"no shipped tokenizer for vocab_size={vocab_size}; shipped sizes: "
                         f"{sizes}. Pick one of those, or train your own and set tokenizer=PATH")
    return path


def load_tokenizer(path_or_name: str | os.PathLike | Tokenizer) -> Tokenizer:
    """Load any supported tokenizer: a ``.model`` (sentencepiece), a ``tokenizer.json`` (HF), a
    folder with ``vocab.json`` + ``merges.txt`` (HF), a minlm byte/char JSON, or a shipped name
    such as ``"tinystories-2048"``."""
    if isinstance(path_or_name, Tokenizer):
        return path_or_name
    path = Path(path_or_name)
    if not path.exists() and str(path_or_name) in shipped_tokenizers():
        path = shipped_tokenizers()[str(path_or_name)]
    if not path.exists():
        raise FileNotFoundError(f"tokenizer {str(path_or_name)!r} not found: no such file, and "
                                f"not a shipped tokenizer (shipped: {sorted(shipped_tokenizers())})")
    if path.is_dir():
        for name in ("tokenizer.model", "tokenizer.json"):
            if (path / name).exists():
                return load_tokenizer(path / name)
        if (path / "vocab.json").exists() and (path / "merges.txt").exists():
            return HFTokenizer.load(path)
        raise FileNotFoundError(f"folder {path} holds no tokenizer: expected tokenizer.model, "
                                "tokenizer.json, or vocab.json + merges.txt")
    if path.suffix == ".model":
        return SentencePieceTokenizer.load(path)
    if path.suffix == ".json":
        try:
            obj = json.loads(path.read_bytes())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from e
        if isinstance(obj, dict) and "minlm_tokenizer" in obj:
            return _TableTokenizer.load(path)
        return HFTokenizer.load(path)
    raise ValueError(f"cannot tell what tokenizer {path} is: expected a .model (sentencepiece), "
                     "a .json (HF tokenizer.json or minlm byte/char), or a folder")


# ---------------------------------------------------------------------------------------
# command line: build and measure tokenizers (the recipe in tokenizers/README.md)
# ---------------------------------------------------------------------------------------

def bytes_per_token(tokenizer: Tokenizer, documents: Iterable[str]) -> tuple[int, int]:
    """(UTF-8 bytes, tokens) over documents, without bos/eos: the compression a vocab buys."""
    n_bytes = n_tokens = 0
    for doc in documents:
        n_bytes += len(doc.encode("utf-8"))
        n_tokens += len(tokenizer.encode(doc))
    return n_bytes, n_tokens


def compression_table(tokenizers: Sequence[str | Tokenizer], documents: Sequence[str]):
    """Bytes per token of each tokenizer (a name, path or object) on the same documents."""
    import pandas as pd

    rows = []
    for t in tokenizers:
        tok = load_tokenizer(t) if isinstance(t, (str, os.PathLike)) else t
        n_bytes, n_tokens = bytes_per_token(tok, documents)
        name = t if isinstance(t, str) else Path(getattr(tok, "path", None) or "custom").stem
        rows.append({"tokenizer": name, "vocab_size": tok.vocab_size, "tokens": n_tokens,
                     "bytes_per_token": n_bytes / max(n_tokens, 1)})
    return pd.DataFrame(rows).sort_values("vocab_size", kind="stable").reset_index(drop=True)


def add_tokenizer_commands(sub) -> None:
    """Register ``train`` and ``measure`` on an argparse subparsers object: the one copy of
    their arguments, used by ``python -m minlm tokenizer`` and ``python -m minlm.tokenizer``."""
    t = sub.add_parser("train", help="train a sentencepiece tokenizer")
    t.add_argument("data", help="dataset name (tinystories, shakespeare) or text file/folder")
    t.add_argument("--vocab-size", type=int, required=True)
    t.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"])
    t.add_argument("--input-sentence-size", type=int, default=20_000,
                   help="documents sampled for training (0 = all)")
    t.add_argument("--out", required=True, help="output .model path")
    t.set_defaults(func=cmd_train)
    m = sub.add_parser("measure", help="bytes per token of tokenizers on a text file")
    m.add_argument("file", help="text file (documents as read by minlm.data.read_documents)")
    m.add_argument("tokenizers", nargs="+", help="tokenizer paths or shipped names")
    m.set_defaults(func=cmd_measure)


def main(argv: Sequence[str] | None = None) -> int:
    """Errors from bad input print one line and exit non-zero, as ``python -m minlm`` does."""
    p = argparse.ArgumentParser(prog="python -m minlm.tokenizer",
                                description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    add_tokenizer_commands(p.add_subparsers(dest="cmd", required=True))
    args = p.parse_args(argv)
    return report_errors(lambda: args.func(args), args.debug)


def cmd_train(args) -> None:
    from minlm.data import resolve_text_files  # lazy: minlm.data imports torch

    train_files, _ = resolve_text_files(args.data)
    tok = SentencePieceTokenizer.train(train_files, args.vocab_size, args.model_type,
                                       out_path=args.out,
                                       input_sentence_size=args.input_sentence_size)
    print(f"wrote {args.out}: vocab {tok.vocab_size}, sha256 {tok.hash[:12]}")


def cmd_measure(args) -> None:
    from minlm.data import read_documents  # lazy: minlm.data imports torch

    print("| tokenizer | vocab | bytes | tokens | bytes/token |\n|---|---|---|---|---|")
    for name in args.tokenizers:
        tok = load_tokenizer(name)
        n_bytes, n_tokens = bytes_per_token(tok, read_documents(args.file))
        print(f"| {name} | {tok.vocab_size} | {n_bytes} | {n_tokens} | "
              f"{n_bytes / n_tokens:.3f} |")


if __name__ == "__main__":
    raise SystemExit(main())
