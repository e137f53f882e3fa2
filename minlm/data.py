"""Text sources -> token shards on disk -> random-window batches.

A corpus is tokenized once (``minlm.prepare``) into ``train.bin`` (or numbered
``train-00000.bin``... shards) and ``val.bin`` (flat uint16/uint32 arrays, each document as
BOS + tokens + EOS) plus ``meta.json``, in a folder keyed by the data, the tokenizer's hash
and the options; later calls memory-map them, so a 2 GB corpus costs no RAM. Where text
comes from (files, folders, ``hf:`` datasets) is ``minlm.sources``; here are the named
corpora and their download, the shard reader and the batches.

    shards = prepare("tinystories", load_tokenizer("tinystories-2048"))
    x, y = get_batch(shards.train, batch_size=32, block_size=256, generator=g)   # (B, T) each
"""

from __future__ import annotations

import functools
import json
import os
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from minlm.fileio import atomic_path
from minlm.sources import (  # noqa: F401 - SEPARATOR and TEXT_SUFFIXES are read from here too
    HF_PREFIX,
    SEPARATOR,
    TEXT_SUFFIXES,
    HubSource,
    folder_files,
    read_records,
)

SHARD_FORMAT = 1  # bump when the shard layout changes, so old caches are rebuilt
DEFAULT_VAL_FRACTION = 0.05
PREFIX_BYTES = 100_000_000  # what a default run downloads of a large corpus (full=True: all)

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


def _download(url: str, dest: Path, limit: int = 0) -> Path:
    """Stream ``url`` into ``dest`` with a progress bar (a temp file until complete).

    With ``limit`` > 0 and a file longer than that (or of unknown length), only its first
    ``limit`` bytes are fetched, cut after the last whole document, and written to the
    prefix name (``_prefix_name``) instead. Returns the path written."""
    try:
        with urllib.request.urlopen(url, timeout=30) as resp:
            total = int(resp.headers.get("Content-Length") or 0) or None
            part = bool(limit) and (total is None or total > limit)
            target = _prefix_name(dest) if part else dest
            with atomic_path(target) as tmp:
                with open(tmp, "wb") as f, tqdm(total=limit if part else total, unit="B",
                                                unit_scale=True, desc=f"downloading {target.name}") as bar:
                    got = 0
                    while chunk := resp.read(min(1 << 20, limit - got) if part else 1 << 20):
                        f.write(chunk)
                        got += len(chunk)
                        bar.update(len(chunk))
                if part and got >= limit:
                    _cut_after_last_document(tmp)
    except (urllib.error.URLError, OSError) as e:
        raise RuntimeError(
            f"could not download {url} ({e}). If this machine is offline, set MINLM_DATA_DIR to "
            f"a folder holding {dest.parent.name}/{dest.name} (for tinystories: "
            "tinystories/train.txt and tinystories/valid.txt)") from e
    return target


def _prefix_name(full_path: Path) -> Path:
    mb = max(1, PREFIX_BYTES // 1_000_000)
    return full_path.with_name(f"{full_path.stem}.first{mb}MB{full_path.suffix}")


def _cut_after_last_document(path: Path) -> None:
    """Truncate a cut-off download after its last complete document (separator line, else
    blank line, else line), so no half document is trained on."""
    with open(path, "rb+") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - (1 << 22)))
        tail = f.read()
        base = size - len(tail)
        for mark in (b"\n" + SEPARATOR.encode() + b"\n", b"\n\n", b"\n"):
            at = tail.rfind(mark)
            if at >= 0:
                f.truncate(base + at + len(mark))
                return


def resolve_text_files(data: str, full: bool = False) -> tuple[list, list]:
    """(train sources, val sources) for a dataset name, a path or a ``hf:`` id.

    ``"tinystories"`` / ``"shakespeare"``: files under ``data_dir()``, downloaded when absent;
    with ``full=False`` a large file is fetched only up to its first ``PREFIX_BYTES`` (cut at
    a document boundary, cached beside it) unless the whole file is already there.
    A file (.txt/.jsonl/.json/.parquet): that file, no val file (``prepare`` splits off val).
    A folder: its files of one format (subfolders too); ones named ``val*``/``valid*`` are
    the val files. ``hf:<id>``: a ``HubSource`` (config and split: see ``prepare``).
    """
    if data.startswith(HF_PREFIX):
        return [HubSource(data[len(HF_PREFIX):])], []
    if data in DATASETS:
        out: dict[str, list[Path]] = {"train": [], "val": []}
        for split, (name, url) in DATASETS[data].items():
            path = data_dir() / data / name
            if not path.exists():
                path = _download(url, path) if full else _prefix_file(url, path)
            out[split].append(path)
        return out["train"], out["val"]
    path = Path(data).expanduser()
    if path.is_file():
        if path.suffix not in TEXT_SUFFIXES:
            raise ValueError(f"data file {path} has suffix {path.suffix!r}; supported: "
                             f"{', '.join(TEXT_SUFFIXES)}")
        return [path], []
    if path.is_dir():
        files = folder_files(path)
        val = [p for p in files if p.stem.startswith(("val", "valid"))]
        train = [p for p in files if p not in val]
        if not train:
            raise ValueError(f"folder {path} holds no training text files "
                             f"({', '.join(TEXT_SUFFIXES)}; val*/valid* files are validation)")
        return train, val
    where = "" if path.is_absolute() else f" (a relative path is read from {Path.cwd()})"
    raise FileNotFoundError(f"data={data!r} is neither a dataset name ({', '.join(DATASETS)}) "
                            f"nor an existing file or folder{where}, nor a {HF_PREFIX}<dataset "
                            "id>; give data=<the path to it>")



def validation_file(data: str) -> Path:
    """The one held-out text file of ``data`` (valid.txt for tinystories): what a final figure
    or a model card is measured on. A dataset with none, or several, is refused by name."""
    from minlm.config import ConfigError

    val = resolve_text_files(data)[1]
    if len(val) != 1:
        raise ConfigError(f"data={data!r} has {len(val)} validation files; name the one to "
                          "measure on (--valid FILE)")
    return Path(val[0])

def _prefix_file(url: str, full_path: Path) -> Path:
    """The first ``PREFIX_BYTES`` of ``url`` (cut after its last whole document), fetched
    once into ``<name>.first<N>MB<suffix>`` beside ``full_path`` and reused after; a file
    shorter than that is fetched whole, to ``full_path``."""
    prefix = _prefix_name(full_path)
    return prefix if prefix.exists() else _download(url, full_path, limit=PREFIX_BYTES)


def read_documents(path: str | os.PathLike, split_by: str = "auto",
                   text_column: str = "text") -> Iterator[str]:
    """Yield the text documents of a file, streaming (a 2 GB file is never read whole).

    Plain text: documents end at a line ``<|endoftext|>``; a file with no such line is split at
    blank lines; ``split_by="line"`` makes each line a document (``minlm.sources``).
    JSONL/JSON/parquet: the ``text_column`` field of each row. Chat conversations are refused
    here: ``prepare`` renders them with the chat template.
    """
    for where, record in read_records(path, text_column, split_by):
        if not isinstance(record, str):
            raise ValueError(f"{where} is a chat conversation, not text (no {text_column!r} "
                             "field); "
                             "prepare() (python -m minlm prepare) renders chat with the chat "
                             "template for pretraining")
        yield record


# ---------------------------------------------------------------------------------------
# tokenized shards
# ---------------------------------------------------------------------------------------

def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 while every id fits (vocab_size <= 65536), else uint32: half the disk and RAM."""
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _Shard:
    """One shard file of a many-shard split, memory-mapped when read: an open map holds a
    file descriptor, so a thousand shards open at once would hit the open-file limit; the
    last ``_open_map``'s few maps stay open."""

    def __init__(self, path: Path, dtype: np.dtype, size: int):
        self.path, self.dtype, self.size = path, np.dtype(dtype), size
        st = os.stat(path)  # in the key: a folder prepared again maps its new files
        self.version = (st.st_ino, st.st_mtime_ns)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, idx):
        return _open_map(self.path, self.dtype.str, self.size, self.version)[idx]


@functools.lru_cache(maxsize=32)
def _open_map(path: Path, dtype: str, size: int, version: tuple) -> np.memmap:
    return np.memmap(path, dtype=np.dtype(dtype), mode="r", shape=(size,))


class TokenStream:
    """Numbered shard files (memory-mapped) read as one flat token array, and an optional
    loss mask of the same length (uint8, 1 = the token is a target).

    Indexing by an int, a slice or an integer array crosses shard boundaries, so a window
    may start in one shard and end in the next; the stream of 3 shards equals that of 1.
    """

    def __init__(self, parts: list[np.ndarray], mask_parts: list[np.ndarray] | None = None):
        if not parts:
            raise ValueError("a token stream needs at least one shard")
        self.parts = parts
        self.ends = np.cumsum([len(p) for p in parts])  # (n_shards,)
        self.dtype = parts[0].dtype
        self.mask = TokenStream(mask_parts) if mask_parts else None

    def __len__(self) -> int:
        return int(self.ends[-1])

    @property
    def shape(self) -> tuple[int]:
        return (len(self),)

    @property
    def ndim(self) -> int:
        return 1

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            start, stop, step = idx.indices(len(self))
            if step != 1:
                return self[np.arange(start, stop, step)]
            return self._range(start, max(start, stop))
        if np.isscalar(idx):
            i = int(idx) + (len(self) if int(idx) < 0 else 0)
            return self[np.array([i])][0]
        idx = np.asarray(idx)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"token index out of range 0..{len(self) - 1}")
        if len(self.parts) == 1:
            return np.asarray(self.parts[0][idx])
        which = np.searchsorted(self.ends, idx, side="right")  # shard of each index
        starts = np.concatenate([[0], self.ends[:-1]])
        out = np.empty(idx.shape, dtype=self.dtype)
        for k in np.unique(which):
            sel = which == k
            out[sel] = self.parts[k][idx[sel] - starts[k]]
        return out

    def _range(self, start: int, stop: int) -> np.ndarray:
        pieces, offset = [], 0
        for part, end in zip(self.parts, self.ends):
            lo, hi = max(start, offset), min(stop, int(end))
            if lo < hi:
                pieces.append(np.asarray(part[lo - offset:hi - offset]))
            offset = int(end)
        return np.concatenate(pieces) if pieces else np.empty(0, self.dtype)

    def __array__(self, dtype=None, copy=None):
        out = self._range(0, len(self))
        return out.astype(dtype) if dtype is not None else out

    def tolist(self) -> list[int]:
        return self._range(0, len(self)).tolist()


@dataclass
class Shards:
    """Token arrays of one prepared corpus (memory-mapped), and what ``meta.json`` says of
    them. ``train`` is a plain memmap for a one-file split, else a ``TokenStream`` over its
    numbered shards (and its loss mask when the corpus was prepared with one)."""

    train: np.ndarray | TokenStream
    val: np.ndarray | TokenStream
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
        meta_path = folder / "meta.json"
        if not meta_path.is_file():
            raise FileNotFoundError(f"{folder} is not a prepared shard folder (no meta.json; "
                                    "an interrupted prepare leaves none): prepare it again")
        meta = json.loads(meta_path.read_text())
        dtype = np.dtype(meta["dtype"])
        arrays = {}
        for split, n in meta["tokens"].items():
            files = meta.get("files", {}).get(split, [[f"{split}.bin", n]])
            one = len(files) == 1  # one file: a plain memmap; many: mapped as they are read

            def part(path, kind, size, one=one):
                return (np.memmap(path, dtype=kind, mode="r", shape=(size,)) if one
                        else _Shard(path, kind, size))

            parts = [part(folder / name, dtype, size) for name, size in files]
            masks = None
            if meta.get("loss_mask"):
                masks = [part(folder / _mask_name(name), np.uint8, size) for name, size in files]
            arrays[split] = parts[0] if len(parts) == 1 and masks is None else TokenStream(parts, masks)
        return cls(arrays["train"], arrays["val"], meta, folder)


def _mask_name(shard_name: str) -> str:
    return shard_name.replace(".bin", ".mask.bin")


def _cache_root(cache_dir) -> Path:
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("MINLM_CACHE_DIR")
    return Path(env) if env else Path.home() / ".cache" / "minlm" / "shards"


def _is_val(index: int, fraction: float) -> bool:
    """Every ~1/fraction-th document goes to val: deterministic, exact share, spread evenly."""
    return int((index + 1) * fraction) > int(index * fraction)


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
    idx = starts[:, None] + np.arange(T + 1)  # (B, T+1)
    buf = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
    x, y = buf[:, :-1].contiguous(), _masked(buf[:, 1:].contiguous(), tokens, idx[:, 1:])  # (B, T)
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
        y = _masked(buf[:, 1:].contiguous(), tokens, idx[:, 1:])
        yield buf[:, :-1].contiguous().to(device), y.to(device)
    tail = len(tokens) - 1 - n_full * T
    if tail:
        idx = np.arange(n_full * T, len(tokens))[None]  # (1, t+1)
        buf = torch.from_numpy(np.asarray(tokens[idx], dtype=np.int64))
        yield buf[:, :-1].contiguous().to(device), _masked(buf[:, 1:].contiguous(), tokens,
                                                          idx[:, 1:]).to(device)


def _masked(y: torch.Tensor, tokens, idx: np.ndarray) -> torch.Tensor:
    """Targets outside the stored loss mask (if the corpus has one) set to -100, the index
    the loss ignores: pretraining on chat trains only the tokens its mask mode selects."""
    mask = getattr(tokens, "mask", None)
    if mask is None:
        return y
    y[torch.from_numpy(np.asarray(mask[idx]) == 0)] = -100
    return y
