"""Text sources -> token shards on disk -> random-window batches.

A corpus is tokenized once into ``train.bin``/``val.bin`` (flat uint16/uint32 arrays, each
document as BOS + tokens + EOS) plus ``meta.json``, in a cache folder keyed by the data, the
tokenizer's hash and the options; later calls memory-map them, so a 2 GB corpus costs no RAM.

    shards = prepare("tinystories", load_tokenizer("tinystories-2048"))
    x, y = get_batch(shards.train, batch_size=32, block_size=256, generator=g)   # (B, T) each
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minlm.fileio import atomic_path, atomic_write_text

SEPARATOR = "<|endoftext|>"
TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")
SHARD_FORMAT = 1  # bump when the shard layout changes, so old caches are rebuilt
DEFAULT_VAL_FRACTION = 0.05

_HF = "https://huggingface.co/datasets/roneneldan/TinyStories/resolve/main/"
_SHAKESPEARE = ("https://raw.githubusercontent.com/karpathy/char-rnn/master/data/"
                "tinyshakespeare/input.txt")
DATASETS = {  # name -> {split: (file under data_dir()/name, download url)}
    "tinystories": {"train": ("train.txt", _HF + "TinyStoriesV2-GPT4-train.txt"),
                    "val": ("valid.txt", _HF + "TinyStoriesV2-GPT4-valid.txt")},
    "shakespeare": {"train": ("input.txt", _SHAKESPEARE)},
}


# ---------------------------------------------------------------------------------------
# where text comes from
# ---------------------------------------------------------------------------------------

def data_dir() -> Path:
    """``$MINLM_DATA_DIR``, else ``./data`` if present, else ``~/.cache/minlm/data`` (created)."""
    env = os.environ.get("MINLM_DATA_DIR")
    if env:
        if Path(env).expanduser().is_file():  # else a missing dataset would be downloaded
            raise NotADirectoryError(f"MINLM_DATA_DIR={env} is a file; point it at the folder "
                                     "that holds the datasets (e.g. tinystories/train.txt)")
        return Path(env).expanduser()
    if Path("data").is_dir():
        return Path("data")
    d = Path.home() / ".cache" / "minlm" / "data"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _download(url: str, dest: Path) -> None:
    """Stream ``url`` into ``dest`` with a progress bar; a temp file until complete."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp, atomic_path(dest) as tmp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True,
                                            desc=f"downloading {dest.name}") as bar:
                while chunk := resp.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"could not download {url} ({e}). If this machine is offline, set MINLM_DATA_DIR to "
            f"a folder holding {dest.parent.name}/{dest.name} (for tinystories: "
            "tinystories/train.txt and tinystories/valid.txt)") from e


def resolve_text_files(data: str) -> tuple[list[Path], list[Path]]:
    """(train files, val files) for a dataset name or a path.

    ``"tinystories"`` / ``"shakespeare"``: files under ``data_dir()``, downloaded when absent.
    A file (.txt/.jsonl/.json/.parquet): that file, no val file (``prepare`` splits off val).
    A folder: its files of those kinds; ones named ``val*``/``valid*`` are the val files.
    """
    if data in DATASETS:
        out: dict[str, list[Path]] = {"train": [], "val": []}
        for split, (name, url) in DATASETS[data].items():
            path = data_dir() / data / name
            if not path.exists():
                _download(url, path)
            out[split].append(path)
        return out["train"], out["val"]
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"data file {path} has suffix {path.suffix!r}; supported: "
                             f"{', '.join(TEXT_SUFFIXES)}")
        return [path], []
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in TEXT_SUFFIXES)
        val = [p for p in files if p.stem.startswith(("val", "valid"))]
        train = [p for p in files if p not in val]
        if not train:
            raise ValueError(f"folder {path} holds no training text files "
                             f"({', '.join(TEXT_SUFFIXES)}; val*/valid* files are validation)")
        return train, val
    raise FileNotFoundError(f"data={data!r} is neither a dataset name ({', '.join(DATASETS)}) "
                            "nor an existing file or folder")


def read_documents(path: str | os.PathLike) -> Iterator[str]:
    """Yield the documents of a file, streaming (a 2 GB file is never read whole).

    Plain text: documents end at a line ``<|endoftext|>``; a file with no such line is split at
    blank lines. JSONL/JSON: the ``"text"`` field of each object. Parquet: the ``text`` column.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file {path} does not exist" if not path.exists()
                                else f"{path} is not a file")
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".parquet": _read_parquet}
    reader = readers.get(path.suffix, _read_text)
    n = 0
    try:
        for doc in reader(path):
            n += 1
            if "\x00" in doc:  # _check_text reads only the head of the file
                raise ValueError(f"{path} is not a UTF-8 text file (document {n} holds NUL "
                                 "bytes: binary data?)")
            yield doc
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not a UTF-8 text file ({e})") from e
    if n == 0:
        raise ValueError(f"{path} holds no documents (it is empty or only whitespace)")


def _check_text(path: Path) -> None:
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


def _read_text(path: Path) -> Iterator[str]:
    _check_text(path)
    by_separator = _has_separator(path)
    lines: list[str] = []
    with open(path, encoding="utf-8") as f:
        for line in f:
            end = line.strip() == SEPARATOR if by_separator else not line.strip()
            if not end:
                lines.append(line)
                continue
            doc = "".join(lines).strip("\n")
            lines = []
            if doc.strip():
                yield doc
    doc = "".join(lines).strip("\n")
    if doc.strip():
        yield doc


def _text_field(obj, where: str) -> str:
    if isinstance(obj, str):
        return obj
    if isinstance(obj, dict) and isinstance(obj.get("text"), str):
        return obj["text"]
    found = list(obj) if isinstance(obj, dict) else type(obj).__name__
    raise ValueError(f"{where} has no string 'text' field (found: {found}); plain-text "
                     "training needs {\"text\": ...} objects")


def _read_jsonl(path: Path) -> Iterator[str]:
    _check_text(path)
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise ValueError(f"line {lineno} of {path} is not valid JSON: {e}") from e
                yield _text_field(obj, f"line {lineno} of {path}")


def _read_json(path: Path) -> Iterator[str]:
    _check_text(path)
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if isinstance(obj, dict) and isinstance(obj.get("text"), list):
        obj = obj["text"]
    items = obj if isinstance(obj, list) else None
    if items is None:
        raise ValueError(f"{path} must hold a list of {{\"text\": ...}} objects or strings, "
                         f"found a {type(obj).__name__}")
    for k, item in enumerate(items):
        yield _text_field(item, f"item {k} of {path}")


def _read_parquet(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow's ArrowInvalid does not name the file
        raise ValueError(f"{path} is not a parquet file: {e}") from e
    if "text" not in pf.schema_arrow.names:
        raise ValueError(f"{path} has no 'text' column (columns: {pf.schema_arrow.names})")
    for batch in pf.iter_batches(columns=["text"]):
        yield from (t for t in batch.column(0).to_pylist() if t)


# ---------------------------------------------------------------------------------------
# tokenized shards
# ---------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536), else uint32: half the disk and RAM."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


@dataclass
class Shards:
    """Memory-mapped token arrays of one prepared corpus, and what ``meta.json`` says of them."""

    train: np.ndarray
    val: np.ndarray
    meta: dict
    dir: Path

    def bytes_per_token(self, split: str = "val") -> float:
        """UTF-8 bytes of text per token (BOS/EOS counted as tokens): turns loss into bits/byte."""
        if split not in ("train", "val"):
            raise ValueError(f"split={split!r}; use 'train' or 'val'")
        return self.meta["bytes"][split] / self.meta["tokens"][split]

    @classmethod
    def load(cls, folder: str | os.PathLike) -> Shards:
        folder = Path(folder)
        meta = json.loads((folder / "meta.json").read_text())
        dtype = np.dtype(meta["dtype"])
        arrays = {s: np.memmap(folder / f"{s}.bin", dtype=dtype, mode="r", shape=(n,))
                  for s, n in meta["tokens"].items()}
        return cls(arrays["train"], arrays["val"], meta, folder)


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MINLM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "minlm" / "shards"


def _file_ids(files: list[Path]) -> list[list]:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _is_val(index: int, fraction: float) -> bool:
    """Every ~1/fraction-th document goes to val: deterministic, exact share, spread evenly."""
    return int((index + 1) * fraction) > int(index * fraction)


_worker_tok = None


def _init_worker(cls, blob: bytes) -> None:
    global _worker_tok
    _worker_tok = cls.from_bytes(blob)


def _encode_chunk(task: tuple[str, list[str]]):
    split, docs = task
    ids = [i for d in docs for i in _worker_tok.encode(d, bos=True, eos=True)]
    return split, ids, sum(len(d.encode("utf-8")) for d in docs), len(docs)


def _tasks(train_files, val_files, fraction, max_docs, chunk_docs=256):
    """(split, documents) chunks in file order; the split is decided here, by document index."""
    def limited(files):
        n = 0
        for f in files:
            for doc in read_documents(f):
                if max_docs and n >= max_docs:
                    return
                n += 1
                yield doc

    buf: dict[str, list[str]] = {"train": [], "val": []}
    sources = [("train", train_files), ("val", val_files)] if val_files else [(None, train_files)]
    for fixed_split, files in sources:
        for k, doc in enumerate(limited(files)):
            split = fixed_split or ("val" if _is_val(k, fraction) else "train")
            buf[split].append(doc)
            if len(buf[split]) >= chunk_docs:
                yield split, buf[split]
                buf[split] = []
    for split, docs in buf.items():
        if docs:
            yield split, docs


def _split_advice(documents: int, max_docs: int) -> str:
    """What would give both splits documents: advice that can help with this data."""
    if max_docs and documents >= max_docs:
        return "raise max_docs or val_fraction"
    if documents >= 2:
        return f"raise val_fraction to at least {1 / documents:.3g}"
    return (f"{documents} document cannot be split into train and validation; add documents "
            "(a text file splits at blank lines or <|endoftext|> lines), or give a folder "
            "holding train.txt and valid.txt")


def prepare(data: str, tokenizer, val_fraction: float = 0.0, num_workers: int = 0,
            max_docs: int = 0, cache_dir: str | os.PathLike | None = None,
            verbose: bool = True) -> Shards:
    """Tokenize ``data`` once into shards (reused while data, tokenizer and options match).

    The val split is the source's val file when it has one; otherwise every document with
    index ``k`` where ``floor((k+1)f) > floor(kf)`` for ``f = val_fraction or 0.05``, so train
    and val never share a document. ``max_docs`` caps the documents read for each file set.
    ``num_workers=0`` uses every core; each worker rebuilds the tokenizer from its bytes.
    """
    from minlm.tokenizer import load_tokenizer

    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    tokenizer = load_tokenizer(tokenizer)  # a Tokenizer passes through; a path or name loads
    train_files, val_files = resolve_text_files(data)
    fraction = 0.0 if val_files else (val_fraction or DEFAULT_VAL_FRACTION)
    dtype = token_dtype(tokenizer.vocab_size)
    key = {"format": SHARD_FORMAT, "data": data, "files": _file_ids(train_files + val_files),
           "tokenizer_hash": tokenizer.hash, "max_docs": max_docs, "val_fraction": fraction}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in Path(data).name)[:40]
    folder = _cache_root(cache_dir) / f"{name}-{digest}"
    if (folder / "meta.json").exists() and json.loads(
            (folder / "meta.json").read_text()).get("key") == key:
        if verbose:
            tqdm.write(f"using cached shards {folder}")
        return Shards.load(folder)

    workers = num_workers or os.cpu_count() or 1
    totals = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in ("train", "val")}
    folder.mkdir(parents=True, exist_ok=True)
    size = sum(f.stat().st_size for f in train_files + val_files)
    with atomic_path(folder / "train.bin") as tmp_train, atomic_path(folder / "val.bin") as tmp_val, \
            open(tmp_train, "wb") as f_train, open(tmp_val, "wb") as f_val, \
            tqdm(total=None if max_docs else size, unit="B", unit_scale=True, disable=not verbose,
                 desc=f"tokenizing {name}") as bar:
        out = {"train": f_train, "val": f_val}
        tasks = _tasks(train_files, val_files, fraction, max_docs)
        init_args = (type(tokenizer), tokenizer.to_bytes())
        pool = get_context().Pool(workers, _init_worker, init_args) if workers > 1 else None
        if pool is None:
            _init_worker(*init_args)
        try:  # a bounded group of chunks at a time: Pool.imap alone would queue the whole corpus
            while group := list(itertools.islice(tasks, 4 * workers)):
                results = pool.imap(_encode_chunk, group) if pool else map(_encode_chunk, group)
                for split, ids, n_bytes, n_docs in results:
                    np.asarray(ids, dtype=dtype).tofile(out[split])
                    totals[split]["tokens"] += len(ids)
                    totals[split]["bytes"] += n_bytes
                    totals[split]["documents"] += n_docs
                    bar.update(n_bytes)
        finally:
            if pool is not None:
                pool.terminate()
        for split, t in totals.items():
            if t["tokens"] == 0:
                raise ValueError(
                    f"the {split} split of {data!r} is empty ({totals['train']['documents']} "
                    f"train documents, val_fraction={fraction}); "
                    + _split_advice(sum(v["documents"] for v in totals.values()), max_docs))
    meta = {"key": key, "source": data, "tokenizer_hash": tokenizer.hash,
            "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "bos_eos": True,
            "split_by": "val file" if val_files else f"fraction {fraction}",
            **{field: {s: t[field] for s, t in totals.items()}
               for field in ("tokens", "documents", "bytes")}}
    atomic_write_text(folder / "meta.json", json.dumps(meta, indent=1))  # last: marks complete
    if verbose:
        tqdm.write(f"shards in {folder}: " + ", ".join(
            f"{s} {t['tokens']:,} tokens / {t['documents']:,} docs" for s, t in totals.items()))
    return Shards.load(folder)


# ---------------------------------------------------------------------------------------
# batches
# ---------------------------------------------------------------------------------------

def _check_split(tokens: np.ndarray, block_size: int) -> None:
    if len(tokens) < block_size + 1:
        raise ValueError(f"the split holds {len(tokens)} tokens, fewer than block_size+1="
                         f"{block_size + 1}; use a smaller block_size or more data")


def get_batch(tokens: np.ndarray, batch_size: int, block_size: int, generator: torch.Generator,
              device="cpu", shard: tuple[int, int] = (0, 1)) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows: x (B, T) int64 and y = x shifted left by one.

    Offsets come from ``torch.randint(generator=...)``, so restoring the generator's state
    replays the exact batches (checkpoint resume relies on it). ``shard=(rank, world)`` draws
    the whole global batch and keeps this rank's slice of B / world rows, so every world size
    trains on the same global batches (and a checkpoint resumes on another world size).
    """
    if batch_size < 1 or block_size < 1:
        raise ValueError(f"batch_size={batch_size} and block_size={block_size} must be >= 1")
    _check_split(tokens, block_size)
    B, T = batch_size, block_size
    starts = torch.randint(len(tokens) - T, (B,), generator=generator).numpy()  # (B,)
    rank, world = shard
    if world > 1:
        per_rank = B // world
        starts = starts[rank * per_rank:(rank + 1) * per_rank]  # (B / world,)
    rows = np.asarray(tokens[starts[:, None] + np.arange(T + 1)], dtype=np.int64)  # (B, T+1)
    buf = torch.from_numpy(rows)
    x, y = buf[:, :-1].contiguous(), buf[:, 1:].contiguous()  # (B, T) each
    if torch.device(device).type == "cuda":
        return x.pin_memory().to(device, non_blocking=True), y.pin_memory().to(device, non_blocking=True)
    return x.to(device), y.to(device)


def iter_eval_batches(tokens: np.ndarray, batch_size: int, block_size: int,
                      device="cpu") -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Consecutive non-overlapping windows over the whole split, in order: every token after
    the first is a target exactly once. Full batches are (B, T); the leftover tail comes last
    as one (1, t) batch with t < T."""
    _check_split(tokens, block_size)
    T = block_size
    n_full = (len(tokens) - 1) // T
    for first in range(0, n_full, batch_size):
        idx = np.arange(first, min(first + batch_size, n_full))[:, None] * T + np.arange(T + 1)
        buf = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))  # (B, T+1)
        yield buf[:, :-1].contiguous().to(device), buf[:, 1:].contiguous().to(device)
    tail = len(tokens) - 1 - n_full * T
    if tail:
        buf = torch.from_numpy(np.asarray(tokens[n_full * T:], dtype=np.int64))[None]  # (1, t+1)
        yield buf[:, :-1].contiguous().to(device), buf[:, 1:].contiguous().to(device)


# ---------------------------------------------------------------------------------------
# chat data (readers, template and SFT examples live in minlm.chatdata)
# ---------------------------------------------------------------------------------------

from minlm.chatdata import (  # noqa: E402 - re-exported: data.py is where people look first
    ChatData,
    ChatDataError,
    Example,
    chat_example,
    chat_examples,
    convert,
    pack_examples,
    parse_chat,
    read_conversations,
    read_preferences,
    render_chat,
    write_conversations,
)
