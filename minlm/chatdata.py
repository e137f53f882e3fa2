"""Chat data: conversations from JSON/JSONL/parquet, the chat template, and SFT examples with
per-token loss masks.

A conversation is a list of messages ``{"role": "system"|"user"|"assistant", "content": str}``
(a system message may only come first). The template is the one ``generate.Chat`` speaks,
built from the tokenizer's reserved tokens::

    <bos><|system|>..<|end|><|user|>..<|end|><|assistant|>..<|end|><|user|>..<|end|>...

An example is the rendered conversation plus a mask with one entry per token: 1 where the
model is trained to predict that token from the ones before it. Three ways to cut a
conversation (``MODES``):

- ``response``: every assistant turn's text and its ``<|end|>`` (one causal pass trains each
  reply given its whole history, so one example per conversation covers every turn);
- ``completion``: the second part of every user and assistant turn (after ``cut`` of its
  tokens) and its ``<|end|>``: predict the rest of a turn from its first part;
- ``imitation``: the text and ``<|end|>`` of user and assistant turns alike: both roles.

Role markers, the system message and BOS are context in every mode. ``Example.display()``
shows the mask (coloured in a notebook, ``[bracketed]`` tokens are in the loss as text).
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from minlm.fileio import atomic_path
from minlm.sources import (  # noqa: F401 - ROLES and check_messages are re-exported here
    ROLES,
    check_messages,
    folder_files,
    jsonl_rows,
    message_pairs,
)
from minlm.tokenizer import BYTE_PIECE

MODES = ("response", "completion", "imitation")
Mode = Literal["response", "completion", "imitation"]
CHAT_SUFFIXES = (".jsonl", ".json", ".parquet")
# chat sets in $MINLM_DATA_DIR that can be named instead of given by path
CHAT_DATASETS = {"hh_rlhf_helpful_sft": "chat/hh_rlhf_helpful_sft.jsonl",
                 "hh_rlhf_helpful_dpo": "chat/hh_rlhf_helpful_dpo.jsonl"}


class ChatDataError(ValueError):
    """A malformed example; the message names the file and the line (or item/row)."""


# ---------------------------------------------------------------------------------------
# validating one example
# ---------------------------------------------------------------------------------------

def check_preference(obj: Any) -> dict[str, Any]:
    """A DPO pair ``{"prompt": [messages] | str, "chosen": str, "rejected": str}`` (chosen and
    rejected may also be message lists ending with the assistant's reply; the prompt then
    defaults to the messages before it)."""
    if not isinstance(obj, dict):
        raise ValueError(f"is a {type(obj).__name__}, not an object with 'prompt', 'chosen' "
                         "and 'rejected'")
    missing = [k for k in ("chosen", "rejected") if k not in obj]
    if missing:
        raise ValueError(f"has no {' or '.join(map(repr, missing))} field (fields: {sorted(obj)})")
    replies, prompt = {}, obj.get("prompt")
    for key in ("chosen", "rejected"):
        value = obj[key]
        if isinstance(value, list):
            msgs = check_messages(value, key)
            if msgs[-1]["role"] != "assistant":
                raise ValueError(f"{key!r} must end with an assistant message")
            prompt = msgs[:-1] if prompt is None else prompt
            value = msgs[-1]["content"]
        if not isinstance(value, str):
            raise ValueError(f"{key!r} must be a string or a list of messages, found "
                             f"{type(value).__name__}")
        replies[key] = value
    if isinstance(prompt, str):
        prompt = [{"role": "user", "content": prompt}]
    if prompt is None:
        raise ValueError("has no 'prompt' field")
    prompt = check_messages(prompt, "prompt")
    if prompt[-1]["role"] == "assistant":
        raise ValueError("'prompt' ends with an assistant message; it should end with the "
                         "turn the chosen/rejected replies answer")
    return {"prompt": prompt, "chosen": replies["chosen"], "rejected": replies["rejected"]}


# ---------------------------------------------------------------------------------------
# reading files
# ---------------------------------------------------------------------------------------

@dataclass
class ChatData:
    """Examples read from a file, and how many malformed ones were skipped (and where)."""

    examples: list
    skipped: int = 0
    problems: list[str] = field(default_factory=list)  # the first few skipped, with location
    path: Path | None = None

    def __len__(self) -> int:
        return len(self.examples)

    def __iter__(self):
        return iter(self.examples)

    def __getitem__(self, i):
        return self.examples[i]

    def __repr__(self) -> str:
        skipped = f", {self.skipped} malformed skipped" if self.skipped else ""
        return f"ChatData({len(self.examples)} examples from {self.path}{skipped})"


def resolve_chat_file(data: str | os.PathLike) -> Path:
    """A chat file (or a folder of them) by path, by a path under ``$MINLM_DATA_DIR``, or by
    name (``hh_rlhf_helpful_sft``, ``hh_rlhf_helpful_dpo``)."""
    from minlm.data import data_dir  # lazy: minlm.data imports torch, chat readers need not

    p = Path(data)
    if p.is_file() or p.is_dir():
        return p
    base = data_dir()
    candidate = base / CHAT_DATASETS.get(str(data), str(data))
    if candidate.is_file():
        return candidate
    raise FileNotFoundError(
        f"chat data {str(data)!r} not found: no such file, nor {candidate} (MINLM_DATA_DIR="
        f"{base}); give a .jsonl/.json/.parquet path or one of {', '.join(CHAT_DATASETS)}")


def _raw_items(path: Path, column: str,
               parquet_columns: Sequence[str] | None = None) -> Iterator[tuple[str, Any]]:
    """(location, raw object) for each example; JSON syntax errors name the line."""
    if path.suffix == ".jsonl":
        yield from jsonl_rows(path)
    elif path.suffix == ".json":
        try:
            obj = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise ChatDataError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
        if isinstance(obj, dict) and isinstance(obj.get(column), list) and obj[column] \
                and isinstance(obj[column][0], dict) and "role" in obj[column][0]:
            obj = [obj]  # one conversation
        if isinstance(obj, list) and obj and all(isinstance(m, dict) and "role" in m and column
                                                 not in m for m in obj):
            obj = message_pairs(obj, str(path))  # a flat list of messages: seed 000's pairs
        if not isinstance(obj, list):
            raise ChatDataError(f"{path}: expected a list of conversations, found a "
                                f"{type(obj).__name__}")
        for k, item in enumerate(obj):
            yield f"{path}, item {k}", item
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            pf = pq.ParquetFile(path)
        except Exception as e:  # noqa: BLE001 - pyarrow's errors do not name the file
            raise ChatDataError(f"{path} is not a parquet file: {e}") from None
        names = pf.schema_arrow.names
        wanted = list(parquet_columns or [column])
        missing = [c for c in wanted if c not in names]
        if missing:
            raise ChatDataError(f"{path} has no {' or '.join(map(repr, missing))} column "
                                f"(columns: {names}); choose one with --column")
        columns = wanted
        row = 0
        for batch in pf.iter_batches(columns=columns):
            for item in batch.to_pylist():
                row += 1
                yield f"{path}, row {row}", item
    else:
        raise ChatDataError(f"{path}: unknown chat file type {path.suffix!r}; use one of "
                            f"{', '.join(CHAT_SUFFIXES)}")


def _read(path, check, column: str, skip_invalid: bool, limit: int,
          parquet_columns: Sequence[str] | None = None) -> ChatData:
    path = resolve_chat_file(path)
    out = ChatData([], path=path)
    files = folder_files(path) if path.is_dir() else [path]
    items = (it for f in files for it in _raw_items(f, column, parquet_columns))
    for where, item in items:
        if limit and len(out.examples) >= limit:
            break
        try:
            if isinstance(item, Exception):
                raise item
            out.examples.append(check(item))
        except ValueError as e:
            if not skip_invalid:
                raise ChatDataError(f"{where}: {e} (pass skip_invalid=True, or --skip-invalid, "
                                    "to skip malformed examples)") from None
            out.skipped += 1
            if len(out.problems) < 5:
                out.problems.append(f"{where}: {e}")
    if not out.examples:
        why = f"; {out.skipped} malformed, first: {out.problems[0]}" if out.skipped else ""
        raise ChatDataError(f"{path} holds no usable examples{why}")
    return out


def read_conversations(path: str | os.PathLike, column: str = "messages",
                       skip_invalid: bool = False, limit: int = 0) -> ChatData:
    """Conversations from a .jsonl (one per line), .json (a list of them, or one flat list of
    messages, read as its user -> assistant pairs) or .parquet (``column``) file, or a folder of such files (one format); each
    example is a list of messages or an object with them under ``column``.

    A malformed example raises ``ChatDataError`` naming the file and line (item, row);
    ``skip_invalid=True`` skips it instead and counts it in ``.skipped``."""
    return _read(path, lambda item: check_messages(item, column), column, skip_invalid, limit)


def read_preferences(path: str | os.PathLike, skip_invalid: bool = False,
                     limit: int = 0) -> ChatData:
    """DPO pairs ``{"prompt", "chosen", "rejected"}`` from .jsonl/.json/.parquet."""
    return _read(path, check_preference, "prompt", skip_invalid, limit,
                 parquet_columns=("prompt", "chosen", "rejected"))


def write_conversations(conversations: Iterable[list[dict]], path: str | os.PathLike) -> int:
    """Write ``{"messages": [...]}`` examples as .jsonl, .json or .parquet (atomically)."""
    path = Path(path)
    if path.suffix not in (".jsonl", ".json", ".parquet"):  # before any folder is created
        raise ChatDataError(f"cannot write {path}: use a .jsonl, .json or .parquet name")
    convs = [list(c) for c in conversations]
    with atomic_path(path) as tmp:
        if path.suffix == ".jsonl":
            with open(tmp, "w", encoding="utf-8") as f:
                for c in convs:
                    f.write(json.dumps({"messages": c}, ensure_ascii=False) + "\n")
        elif path.suffix == ".json":
            Path(tmp).write_text(json.dumps([{"messages": c} for c in convs],
                                            ensure_ascii=False, indent=1), encoding="utf-8")
        elif path.suffix == ".parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            message = pa.struct([("role", pa.string()), ("content", pa.string())])
            table = pa.table({"messages": pa.array(convs, type=pa.list_(message))})
            pq.write_table(table, tmp)
        else:
            raise ChatDataError(f"cannot write {path}: use a .jsonl, .json or .parquet name")
    return len(convs)


def convert(src: str | os.PathLike, dest: str | os.PathLike, column: str = "messages",
            skip_invalid: bool = False) -> ChatData:
    """Read conversations from ``src`` (``column``) and write them to ``dest``; the format of
    each follows its suffix. Returns what was read (with the skipped count)."""
    data = read_conversations(src, column=column, skip_invalid=skip_invalid)
    write_conversations(data.examples, dest)
    return data


# ---------------------------------------------------------------------------------------
# the chat template
# ---------------------------------------------------------------------------------------

def _specials(tokenizer) -> dict[str, int]:
    return tokenizer.chat_tokens  # raises a clear ValueError for a tokenizer without them


def turn_ids(tokenizer, role: str, content: str, strict: bool = True) -> list[int]:
    """``<|role|>`` + the content's ids + ``<|end|>``: one turn, as Chat renders it.

    ``strict`` refuses content that holds a chat token's text (it would parse as a turn
    boundary); Chat passes ``strict=False`` so a reply quoting one does not end the chat."""
    special = _specials(tokenizer)
    if role not in ROLES:
        raise ValueError(f"role={role!r} is invalid; roles are {', '.join(ROLES)}")
    body = tokenizer.encode(content)
    clash = set(body) & set(special.values())
    if clash and strict:
        names = [k for k, v in special.items() if v in clash]
        raise ValueError(f"a {role} message contains the chat token(s) "
                         f"{', '.join('<|' + n + '|>' for n in names)} as text; the template "
                         "could not tell it from a turn boundary")
    return [special[role]] + body + [special["end"]]


def _rendered_turns(tokenizer, messages: Sequence[dict]) -> list[tuple[str, list[int]]]:
    return [(m["role"], turn_ids(tokenizer, m["role"], m["content"])) for m in messages]


def render_chat(tokenizer, messages: Sequence[dict],
                add_generation_prompt: bool = False) -> list[int]:
    """Ids of a conversation: BOS, then each turn; with ``add_generation_prompt`` the
    ``<|assistant|>`` that starts the reply (what ``generate.Chat`` feeds the model)."""
    ids = [tokenizer.bos_id]
    for _, t in _rendered_turns(tokenizer, messages):
        ids += t
    if add_generation_prompt:
        ids.append(_specials(tokenizer)["assistant"])
    return ids


def parse_chat(tokenizer, ids: Iterable[int]) -> list[dict[str, str]]:
    """The messages in rendered ids (inverse of ``render_chat``). BOS/EOS/padding are ignored;
    an unfinished last turn (no ``<|end|>`` yet, e.g. a reply being generated) comes back
    with the text so far."""
    special = _specials(tokenizer)
    role_of = {special[r]: r for r in ROLES}
    end, skip = special["end"], {tokenizer.bos_id, tokenizer.eos_id, tokenizer.pad_id}
    messages, role, body = [], None, []
    for pos, i in enumerate(int(i) for i in ids):
        if i in skip and role is None:
            continue
        if role is None:
            if i not in role_of:
                raise ValueError(f"token {pos} ({tokenizer.id_to_piece(i)!r}) is outside any "
                                 "turn: expected a role marker <|system|>, <|user|> or "
                                 "<|assistant|>")
            role, body = role_of[i], []
        elif i == end:
            messages.append({"role": role, "content": tokenizer.decode(body)})
            role = None
        elif i in role_of:
            raise ValueError(f"token {pos} starts a {role_of[i]} turn inside an unfinished "
                             f"{role} turn (no <|end|> before it)")
        else:
            body.append(i)
    if role is not None:
        messages.append({"role": role, "content": tokenizer.decode(body)})
    return messages


# ---------------------------------------------------------------------------------------
# training examples and their masks
# ---------------------------------------------------------------------------------------

@dataclass
class Example:
    """Token ids and a loss mask of the same length: ``mask[i] == 1`` when token ``i`` is a
    target (predicted from ``ids[:i]``). Train on ``x = ids[:-1]``, ``y = ids[1:]``,
    ``loss_mask = mask[1:]``."""

    ids: list[int]
    mask: list[int]
    tokenizer: Any = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.mask):
            raise ValueError(f"ids ({len(self.ids)}) and mask ({len(self.mask)}) differ in length")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_trained(self) -> int:
        return sum(self.mask)

    def display(self, tokenizer=None) -> MaskDisplay:
        tok = tokenizer or self.tokenizer
        if tok is None:
            raise ValueError("display() needs the tokenizer: example.display(tokenizer)")
        return MaskDisplay(self.ids, self.mask, readable_pieces(tok, self.ids, self.mask))


def readable_pieces(tok, ids: Sequence[int], mask: Sequence[int]) -> list[str]:
    """``piece_text`` of each token, except that a run of byte-fallback tokens with the same
    mask that decodes to whole characters shows as those characters (a curly apostrophe,
    not ``<0xE2><0x80><0x99>``): the first token of the run carries the text, the rest ``""``."""
    pieces = [tok.piece_text(i) for i in ids]
    k = 0
    while k < len(ids):
        end = k
        while end < len(ids) and BYTE_PIECE.match(pieces[end]) and mask[end] == mask[k]:
            end += 1
        if end - k >= 1 and BYTE_PIECE.match(pieces[k]):
            text = tok.decode(list(ids[k:end]))
            if text and "\ufffd" not in text:
                pieces[k:end] = [text] + [""] * (end - k - 1)
        k = max(end, k + 1)
    return pieces


class MaskDisplay:
    """Tokens with their loss mask: in a notebook, trained tokens green and context grey;
    as text, each trained token in ``[brackets]`` and context tokens plain."""

    def __init__(self, ids: list[int], mask: list[int], pieces: list[str]):
        self.ids, self.mask, self.pieces = ids, mask, pieces

    def __str__(self) -> str:
        body = "".join(f"[{p}]" if m else p for p, m in zip(self.pieces, self.mask) if p)
        return (body.replace("\n", "\\n")
                + f"\n({len(self.ids)} tokens, {sum(self.mask)} in the loss, in [brackets])")

    __repr__ = __str__

    def _repr_html_(self) -> str:
        spans = []
        for i, p, m in zip(self.ids, self.pieces, self.mask):
            if not p:  # a byte token shown by the character its run decodes to
                continue
            style = ("background:#c8f0c8;color:#000" if m else "background:#eee;color:#888")
            shown = html.escape(p).replace("\n", "↵<br>")
            spans.append(f'<span title="id {i}, {"trained" if m else "context"}" '
                         f'style="{style};border-radius:3px;padding:0 1px;margin:0 1px">'
                         f"{shown}</span>")
        return ('<div style="font-family:monospace;white-space:pre-wrap;line-height:1.9">'
                + "".join(spans) + f"</div><small>{len(self.ids)} tokens; "
                f'<span style="background:#c8f0c8">{sum(self.mask)} in the loss</span>, '
                '<span style="background:#eee;color:#888">context</span></small>')


def chat_example(tokenizer, messages: Sequence[dict], mode: Mode = "response",
                 cut: float = 0.5) -> Example:
    """A conversation as one example with its loss mask (see the module docstring for the
    modes); ``cut`` is the share of each turn's tokens given as context in completion mode."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r} is invalid; modes are {', '.join(MODES)}")
    if not 0 <= cut < 1:
        raise ValueError(f"cut={cut} is invalid: must be in [0, 1)")
    ids, mask = [tokenizer.bos_id], [0]
    for role, t in _rendered_turns(tokenizer, messages):
        n_body = len(t) - 2
        if role == "system" or (mode == "response" and role == "user"):
            trained = [0] * len(t)
        elif mode == "completion":
            given = max(1, int(n_body * cut)) if n_body else 0  # at least one token of prompt
            trained = [0] * (1 + given) + [1] * (len(t) - 1 - given)
        else:  # response (assistant) or imitation (user and assistant)
            trained = [0] + [1] * (len(t) - 1)
        ids += t
        mask += trained
    return Example(ids, mask, tokenizer)


@dataclass
class ExampleStats:
    examples: int = 0
    truncated: int = 0  # longer than the context: cut to fit
    dropped: int = 0  # nothing left to train on after cutting
    invalid: int = 0  # could not be rendered (e.g. chat tokens as text), with skip_invalid


def chat_examples(tokenizer, conversations: Iterable[Sequence[dict]], mode: Mode = "response",
                  max_len: int | None = None, cut: float = 0.5,
                  skip_invalid: bool = False) -> tuple[list[Example], ExampleStats]:
    """Examples of every conversation, cut to ``max_len`` tokens (the model's block_size + 1:
    inputs and targets); those with no trained token left are dropped and counted."""
    stats, out = ExampleStats(), []
    for k, conv in enumerate(conversations):
        try:
            ex = chat_example(tokenizer, conv, mode, cut)
        except ValueError as e:
            if not skip_invalid:
                raise ChatDataError(f"conversation {k}: {e}") from None
            stats.invalid += 1
            continue
        if max_len is not None and len(ex) > max_len:
            ex = Example(ex.ids[:max_len], ex.mask[:max_len], tokenizer)
            stats.truncated += 1
        if not any(ex.mask[1:]):
            stats.dropped += 1
            continue
        out.append(ex)
    stats.examples = len(out)
    return out, stats


def pack_examples(examples: Sequence[Example], length: int, pad_id: int) -> list[Example]:
    """Short examples concatenated into rows of ``length`` tokens, in order (a row is closed
    when the next example does not fit), padded with ``pad_id`` under mask 0. Each example
    starts with BOS; attention is not blocked between examples of a row (plain packing)."""
    rows, ids, mask = [], [], []
    for ex in examples:
        if len(ex) > length:
            raise ValueError(f"an example of {len(ex)} tokens does not fit a row of {length}; "
                             "cut examples with chat_examples(max_len=...) first")
        if len(ids) + len(ex) > length:
            rows.append(Example(ids + [pad_id] * (length - len(ids)),
                                mask + [0] * (length - len(ids))))
            ids, mask = [], []
        ids, mask = ids + ex.ids, mask + ex.mask
    if ids:
        rows.append(Example(ids + [pad_id] * (length - len(ids)), mask + [0] * (length - len(ids))))
    return rows
