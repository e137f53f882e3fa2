"""Where training text comes from: files, folders and Hugging Face datasets, read as a stream
of records, each either a text document or a chat conversation.

    for where, record in read_records("chats/", text_column="text"):
        ...  # record is a str (a document) or a list of {"role", "content"} messages

Accepted shapes, so data prepared for other projects loads as it is:

- plain text: documents end at a line ``<|endoftext|>``; a file without one is split at blank
  lines (``split_by="auto"``); ``split_by="line"`` makes every line a document, ``"doc"`` only
  splits at the separator, ``"blank-line"`` only at blank lines;
- JSONL / JSON / parquet rows: a string, an object with the ``text_column`` field, an object
  with ``"messages"`` (a conversation), or a list of messages; a JSON file may also be a whole
  flat list of ``{"role", "content"}`` messages, read as seed 000 reads it: its user ->
  assistant pairs, one conversation each (``message_pairs``);
- a folder: every file of one format in it (and its subfolders), in sorted order;
- ``hf:<dataset id>``: a Hugging Face dataset read with ``datasets`` in streaming mode, so
  nothing is downloaded whole (a local folder after ``hf:`` goes through the same loader).

Every error names the file and the line, item or row, and what would be valid.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

SEPARATOR = "<|endoftext|>"
# the longest document prepare takes: it is tokenized in one call, whose token list costs
# about 50 bytes a character (a 50 MB line took 2.4 GB); real documents are far shorter
MAX_DOC_CHARS = 8 << 20
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SPLIT_BY = ("auto", "doc", "line", "blank-line")
HF_PREFIX = "hf:"
ROLES = ("system", "user", "assistant")  # of a chat message

Record = str | list  # a document's text, or a conversation (a list of messages)


@dataclass(frozen=True)
class HubSource:
    """A Hugging Face dataset split, read by streaming."""

    name: str
    config: str | None = None
    split: str = "train"

    def __str__(self) -> str:
        return HF_PREFIX + self.name + (f" ({self.config})" if self.config else "") + f" [{self.split}]"


def check_split_by(split_by: str) -> str:
    if split_by not in SPLIT_BY:
        raise ValueError(f"split_by={split_by!r} is invalid; choose one of {', '.join(SPLIT_BY)}")
    return split_by


# ---------------------------------------------------------------------------------------
# folders
# ---------------------------------------------------------------------------------------

def folder_files(folder: Path) -> list[Path]:
    """The data files under ``folder`` (recursively, sorted); all must share one format."""
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES
                   and not any(part.startswith(".") for part in p.relative_to(folder).parts))
    if not files:
        raise ValueError(f"folder {folder} holds no data files ({', '.join(TEXT_SUFFIXES)}); "
                         "it is an empty source")
    kinds = sorted({p.suffix for p in files})
    if len(kinds) > 1:
        examples = {k: next(p.name for p in files if p.suffix == k) for k in kinds}
        raise ValueError(f"folder {folder} mixes formats ({', '.join(f'{k} e.g. {n}' for k, n in examples.items())}); "
                         "put each format in its own folder and prepare them one at a time")
    return files


# ---------------------------------------------------------------------------------------
# records of one file
# ---------------------------------------------------------------------------------------

def check_messages(obj: Any, column: str = "messages") -> list[dict[str, str]]:
    """The conversation in ``obj`` (a list of messages, or an object holding one under
    ``column``) as clean ``{"role", "content"}`` dicts; ValueError says what is wrong."""
    if isinstance(obj, dict):
        if column not in obj:
            raise ValueError(f"has no {column!r} field (fields: {sorted(obj)})")
        obj = obj[column]
    if not isinstance(obj, (list, tuple)):
        raise ValueError(f"{column!r} must be a list of messages, found {type(obj).__name__}")
    if not obj:
        raise ValueError("the conversation has no messages")
    out = []
    for k, m in enumerate(obj):
        if not isinstance(m, dict):
            raise ValueError(f"message {k} is a {type(m).__name__}, not an object with "
                             "'role' and 'content'")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise ValueError(f"message {k} has role {role!r}; roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise ValueError(f"message {k} ({role}) has content of type "
                             f"{type(content).__name__}, not a string")
        if role == "system" and k != 0:
            raise ValueError(f"message {k} is a system message; only the first may be one")
        out.append({"role": role, "content": content})
    if all(m["role"] == "system" for m in out):
        raise ValueError("the conversation has only a system message")
    return out


def message_pairs(messages: list[dict], where: str) -> list[list[dict]]:
    """A flat list of messages as its query -> target pairs: one conversation per user message
    and the assistant reply after it, a system message kept with the pair it precedes.

    Why: seed 000's training files are such lists and its trainer read them as pairs; read as
    one conversation, a file was one document that no val split could divide. A file meant as
    one conversation says so: ``{"messages": [...]}``.
    """
    pairs, pending = [], []
    for k, m in enumerate(messages):
        role = m.get("role")
        last = pending[-1].get("role") if pending else None
        wanted = ("assistant",) if last == "user" else ("user",) if last == "system" \
            else ("system", "user")
        if role not in wanted:
            raise ValueError(
                f"{where}, message {k}: role {role!r} where {' or '.join(map(repr, wanted))} "
                "was expected (a flat list of messages is read as user -> assistant pairs, a "
                "system message before its pair); to keep the messages as one conversation, "
                'write {"messages": [...]}')
        pending.append(m)
        if role == "assistant":
            pairs.append(pending)
            pending = []
    if pending:
        raise ValueError(f"{where}, message {len(messages) - 1}: the last {pending[-1]['role']}"
                         " message has no assistant reply after it (a flat list of messages is "
                         "read as user -> assistant pairs); add the reply or drop the message")
    return pairs


def to_record(obj: Any, where: str, text_column: str = "text") -> Record:
    """A row as a document (str) or a conversation (checked messages); ValueError otherwise."""
    try:
        if isinstance(obj, str):
            return obj
        if isinstance(obj, dict):
            if isinstance(obj.get(text_column), str):
                return obj[text_column]
            if "messages" in obj and text_column not in obj:
                return check_messages(obj)
            if text_column in obj:
                raise ValueError(f"field {text_column!r} is a {type(obj[text_column]).__name__}, "
                                 "not a string")
            raise ValueError(f"has no {text_column!r} field and no 'messages' (fields: "
                             f"{sorted(obj)}); name the text field with text_column= "
                             "(--text-column)")
        if isinstance(obj, list):
            return check_messages(obj)
        raise ValueError(f"is a {type(obj).__name__}; expected a string, an object with "
                         f"{text_column!r} or 'messages', or a list of messages")
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None


def _check_text_file(path: Path) -> None:
    with open(path, "rb") as f:
        head = f.read(1 << 16)
    if b"\x00" in head:
        raise ValueError(f"{path} is not a UTF-8 text file (it holds NUL bytes: binary data?)")


def _has_separator(path: Path) -> bool:
    needle = SEPARATOR.encode()
    with open(path, "rb") as f:
        tail = b""
        while chunk := f.read(1 << 22):
            if needle in tail + chunk:
                return True
            tail = chunk[-len(needle):]
    return False


def _lines(f, path: Path, start_of) -> Iterator[tuple[int, str]]:
    """The numbered lines of a text file, each read with a bound: one huge line (a file
    with no line breaks) is refused after ``MAX_DOC_CHARS``, not read whole."""
    lineno = 0
    while line := f.readline(MAX_DOC_CHARS + 1):
        lineno += 1
        if len(line) > MAX_DOC_CHARS:
            raise _too_long(path, start_of(lineno))
        yield lineno, line


def _too_long(path: Path, lineno: int) -> ValueError:
    return ValueError(f"{path}, line {lineno}: a document longer than {MAX_DOC_CHARS:,} "
                      "characters (one document is tokenized at once); split the text into "
                      f"documents at blank lines or {SEPARATOR} lines, or pass --split-by line")


def _read_text(path: Path, split_by: str) -> Iterator[tuple[str, Record]]:
    _check_text_file(path)
    if split_by == "auto":
        split_by = "doc" if _has_separator(path) else "blank-line"
    with open(path, encoding="utf-8") as f:
        if split_by == "line":
            for lineno, line in _lines(f, path, lambda n: n):
                if line.strip():
                    yield f"{path}, line {lineno}", line.rstrip("\r\n")
            return
        lines: list[str] = []
        start, size = 1, 0
        # the lambda reads start and lines as they are when a line is refused (late binding)
        for lineno, line in _lines(f, path, lambda n: start if lines else n):  # noqa: B023
            end = line.strip() == SEPARATOR if split_by == "doc" else not line.strip()
            if not end:
                if not lines:
                    start, size = lineno, 0
                size += len(line)
                if size > MAX_DOC_CHARS:
                    raise _too_long(path, start)
                lines.append(line)
                continue
            doc = "".join(lines).strip("\n")
            lines = []
            if doc.strip():
                yield f"{path}, line {start}", doc
        doc = "".join(lines).strip("\n")
        if doc.strip():
            yield f"{path}, line {start}", doc


def jsonl_rows(path: Path) -> Iterator[tuple[str, Any]]:
    """``(where, object)`` per non-blank line; a line that is not JSON comes as a ValueError
    object in place of the row, so a caller may skip it (chatdata's skip_invalid) or raise."""
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}, line {lineno}"
            try:
                yield where, json.loads(line)
            except json.JSONDecodeError as e:
                yield where, ValueError(f"is not valid JSON ({e.msg} at column {e.colno})")


def _read_jsonl(path: Path, text_column: str) -> Iterator[tuple[str, Record]]:
    _check_text_file(path)
    for where, obj in jsonl_rows(path):
        if isinstance(obj, ValueError):
            raise ValueError(f"{where}: {obj}")
        yield where, to_record(obj, where, text_column)


def _is_message(obj: Any) -> bool:
    return isinstance(obj, dict) and "role" in obj and "content" in obj and "messages" not in obj


def _read_json(path: Path, text_column: str) -> Iterator[tuple[str, Record]]:
    """A list of rows, ``{text_column: [...]}``, one ``{"messages": [...]}`` conversation, or a
    flat list of messages (its user -> assistant pairs). JSON is not streamable: the file is
    read whole."""
    _check_text_file(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}, line {e.lineno}: not valid JSON ({e.msg})") from None
    if isinstance(obj, dict) and isinstance(obj.get(text_column), list):
        obj = obj[text_column]
    elif isinstance(obj, dict) and isinstance(obj.get("messages"), list) \
            and all(_is_message(m) for m in obj["messages"]):
        obj = [obj]  # one conversation
    if not isinstance(obj, list):
        raise ValueError(f"{path}: expected a list of rows or messages, found a "
                         f"{type(obj).__name__}")
    if obj and all(_is_message(m) for m in obj):
        for k, pair in enumerate(message_pairs(obj, str(path))):
            where = f"{path}, pair {k}"
            yield where, to_record(pair, where, text_column)
        return
    for k, item in enumerate(obj):
        where = f"{path}, item {k}"
        yield where, to_record(item, where, text_column)


def _read_parquet(path: Path, text_column: str) -> Iterator[tuple[str, Record]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # noqa: BLE001 - pyarrow's errors do not name the file
        raise ValueError(f"{path} is not a parquet file: {e}") from None
    names = pf.schema_arrow.names
    column = text_column if text_column in names else "messages" if "messages" in names else None
    if column is None:
        raise ValueError(f"{path} has no {text_column!r} column and no 'messages' column "
                         f"(columns: {names}); name the text column with text_column= "
                         "(--text-column)")
    row = 0
    for batch in pf.iter_batches(columns=[column]):
        for value in batch.column(0).to_pylist():
            row += 1
            if value is None:
                continue
            where = f"{path}, row {row}"
            yield where, to_record({column: value}, where, text_column)


def _read_hub(src: HubSource, text_column: str) -> Iterator[tuple[str, Record]]:
    try:
        import datasets
    except ImportError:
        raise RuntimeError(f"reading {HF_PREFIX}{src.name} needs the 'datasets' package: "
                           "pip install \"minlm[data]\" (the data extra; or download the files "
                           "and prepare their folder instead)") from None
    try:
        ds = datasets.load_dataset(src.name, src.config, split=src.split, streaming=True)
        rows = iter(ds)
        first = next(rows, None)
    except (ConnectionError, OSError, FileNotFoundError, ValueError) as e:
        raise RuntimeError(
            f"could not open the Hugging Face dataset {src.name!r} (config={src.config!r}, "
            f"split={src.split!r}): {type(e).__name__}: {e}. If this machine is offline, "
            "download its files (parquet/JSONL) elsewhere and prepare that folder: "
            f"'prepare path/to/folder', or '{HF_PREFIX}path/to/folder' for the same loader") from e
    if first is None:
        return
    if isinstance(first, dict) and text_column not in first and "messages" not in first:
        raise ValueError(f"{src} has no {text_column!r} column and no 'messages' column "
                         f"(columns: {sorted(first)}); name the text column with "
                         "text_column= (--text-column)")
    import itertools

    for k, row in enumerate(itertools.chain([first], rows)):
        where = f"{src}, row {k + 1}"
        yield where, to_record(row, where, text_column)


def read_records(source: str | os.PathLike | HubSource, text_column: str = "text",
                 split_by: str = "auto") -> Iterator[tuple[str, Record]]:
    """``(where, record)`` for every document or conversation of a file, folder or hub split,
    streaming; raises ValueError naming the source when it holds none."""
    check_split_by(split_by)
    if isinstance(source, HubSource):
        readers = [lambda: _read_hub(source, text_column)]
        name = str(source)
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"data file {path} does not exist")
        files = folder_files(path) if path.is_dir() else [path]
        readers = [lambda f=f: read_file_records(f, text_column, split_by) for f in files]
        name = str(path)
    n = 0
    for reader in readers:
        for where, record in reader():
            n += 1
            if isinstance(record, str) and "\x00" in record:  # the file check reads its head
                raise ValueError(f"{where.split(',')[0]} is not a UTF-8 text file (document {n} "
                                 "holds NUL bytes: binary data?)")
            yield where, record
    if n == 0:
        raise ValueError(f"{name} holds no documents (it is empty or only whitespace)")


def read_file_records(path: Path, text_column: str = "text",
                      split_by: str = "auto") -> Iterator[tuple[str, Record]]:
    """The records of one file, by its suffix (anything but .jsonl/.json/.parquet is text)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist" if not path.exists()
                                else f"{path} is not a file")
    try:
        if path.suffix == ".jsonl":
            yield from _read_jsonl(path, text_column)
        elif path.suffix == ".json":
            yield from _read_json(path, text_column)
        elif path.suffix == ".parquet":
            yield from _read_parquet(path, text_column)
        else:
            yield from _read_text(path, split_by)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text file ({e})") from None
