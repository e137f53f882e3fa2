"""Any source -> the shard folder the trainer reads (``python -m minlm prepare``).

    shards = prepare("hf:HuggingFaceFW/fineweb-edu", "tinystories-4096", max_tokens=50_000_000,
                     shard_tokens=10_000_000, hf_config="sample-10BT")
    train(model_cfg, TrainConfig(data=str(shards.dir), ...))

Records stream from ``minlm.sources`` (files, folders, Hub datasets), are tokenized in
worker processes a bounded group of chunks at a time (memory stays flat however large the
source), and land in ``train.bin`` / ``train-00000.bin``... and ``val.bin``: each document
as BOS + tokens + EOS; a conversation rendered with the chat template. With ``loss_mask``
a ``*.mask.bin`` beside each shard says which tokens are targets (``chatdata.MODES``), and
``get_batch`` sets the others to the ignored index. The folder is written as a temp
sibling and swapped in whole at the end (``minlm.outputs``: an output folder the user
names is replaced only when prepare wrote it); ``meta.json`` comes last and marks it
complete, so an interrupted prepare leaves nothing a run would trust.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from minlm.fileio import atomic_write_text, waiting_lock
from minlm.outputs import check_target, staged
from minlm.chatdata import MODES, ChatDataError, chat_example
from minlm.data import (
    DEFAULT_VAL_FRACTION,
    Shards,
    _cache_root,
    _is_val,
    resolve_text_files,
    token_dtype,
)
from minlm.sources import HF_PREFIX, HubSource, check_split_by, folder_files, read_records
from minlm.tokenizer import load_tokenizer

CHUNK_DOCS = 256  # records per task sent to a worker


def _cache_key_name(data: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in
                   (data[len(HF_PREFIX):] if data.startswith(HF_PREFIX) else Path(data).name))[:40]


def _source_ids(sources: list) -> list:
    """What identifies the sources' content: path, size and mtime of files; the Hub spec."""
    out = []
    for s in sources:
        if isinstance(s, HubSource):
            out.append([str(s)])
            continue
        for f in folder_files(s) if Path(s).is_dir() else [Path(s)]:
            st = f.stat()
            out.append([str(f.resolve()), st.st_size, st.st_mtime_ns])
    return out


def is_shard_folder(data: str | os.PathLike) -> bool:
    """True for a folder ``prepare`` wrote (it holds ``meta.json`` with a token count)."""
    meta = Path(data) / "meta.json"
    if not meta.is_file():
        return False
    try:
        return "tokens" in json.loads(meta.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False


# ---------------------------------------------------------------------------------------
# workers: records -> ids (and masks)
# ---------------------------------------------------------------------------------------

_worker: dict = {}


def _init_worker(cls, blob: bytes, loss_mask: str | None) -> None:
    _worker["tok"] = cls.from_bytes(blob)
    _worker["loss_mask"] = loss_mask


def _encode_chunk(task):
    """(group, is_val per record, ids, mask or None, tokens per record, bytes per record)."""
    group, items = task
    tok, mode = _worker["tok"], _worker["loss_mask"]
    ids, masks, lengths, n_bytes = [], [], [], []
    for _, where, record in items:
        if isinstance(record, str):
            doc = tok.encode(record, bos=True, eos=True)
            if mode:
                masks += [0] + [1] * (len(doc) - 1)
            n_bytes.append(len(record.encode("utf-8")))
        else:
            try:
                ex = chat_example(tok, record, mode or "response")
            except ValueError as e:
                raise ChatDataError(f"{where}: {e}") from None
            doc = ex.ids + [tok.eos_id]
            if mode:
                masks += ex.mask + [0]
            n_bytes.append(sum(len(m["content"].encode("utf-8")) for m in record))
        ids += doc
        lengths.append(len(doc))
    return (group, np.array([v for v, _, _ in items], bool), ids, masks if mode else None,
            np.array(lengths, np.int64), np.array(n_bytes, np.int64))


def _tasks(sets, fraction, max_docs, text_column, split_by, done: set):
    """(group, [(is_val, where, record), ...]) chunks in source order. A group is one set of
    sources with a fixed split (None: val split off by document index); a group in ``done``
    is read no further (its token budget is spent)."""
    for group, (fixed_split, sources) in enumerate(sets):
        chunk, k = [], 0
        for where, record in itertools.chain.from_iterable(
                read_records(src, text_column, split_by) for src in sources):
            if group in done or (max_docs and k >= max_docs):
                break
            is_val = fixed_split == "val" or (fixed_split is None and _is_val(k, fraction))
            k += 1
            chunk.append((is_val, where, record))
            if len(chunk) >= CHUNK_DOCS:
                yield group, chunk
                chunk = []
        if chunk:
            yield group, chunk


# ---------------------------------------------------------------------------------------
# writing shards
# ---------------------------------------------------------------------------------------

class _SplitWriter:
    """Appends a split's tokens (and mask) to numbered shard files of ``shard_tokens`` each
    (one ``<split>.bin`` when 0) in the staging folder, one file (and its mask) open at a
    time: a thousand shards must not need a thousand open files."""

    def __init__(self, folder: Path, split: str, dtype, shard_tokens: int, with_mask: bool):
        self.folder, self.split, self.dtype = folder, split, dtype
        self.shard_tokens, self.with_mask = shard_tokens, with_mask
        self.files: list[list] = []  # [name, tokens]
        self._out = self._mask_out = None

    def _open(self) -> None:
        self.close()
        name = (f"{self.split}-{len(self.files):05d}.bin" if self.shard_tokens
                else f"{self.split}.bin")
        self.files.append([name, 0])
        self._out = open(self.folder / name, "wb")  # noqa: SIM115 - open until close()
        if self.with_mask:
            self._mask_out = open(  # noqa: SIM115 - open until close()
                self.folder / name.replace(".bin", ".mask.bin"), "wb")

    def close(self) -> None:
        for f in (self._out, self._mask_out):
            if f is not None:
                f.flush()
                os.fsync(f.fileno())
                f.close()
        self._out = self._mask_out = None

    def write(self, ids: np.ndarray, mask: np.ndarray | None) -> None:
        while len(ids):
            if self._out is None or (self.shard_tokens and self.files[-1][1] >= self.shard_tokens):
                self._open()
            room = self.shard_tokens - self.files[-1][1] if self.shard_tokens else len(ids)
            ids[:room].tofile(self._out)
            if self.with_mask:
                mask[:room].tofile(self._mask_out)
                mask = mask[room:]
            self.files[-1][1] += len(ids[:room])
            ids = ids[room:]


def _empty_split_advice(data, split, totals, fraction, max_docs) -> str:
    docs = totals["train"]["documents"]
    documents = sum(v["documents"] for v in totals.values())
    if documents <= 1:
        advice = (f"{documents} document cannot be split into train and validation; add "
                  "documents (a text file splits at blank lines or <|endoftext|> lines; with "
                  "one example per line pass split_by='line', --split-by line), or give a "
                  "folder holding train.txt and valid.txt")
    elif max_docs and documents >= max_docs:
        advice = "raise max_docs/max_tokens or val_fraction"
    else:
        advice = f"raise val_fraction to at least {1 / documents:.3g}"
    return (f"the {split} split of {data!r} is empty ({docs} train documents, "
            f"val_fraction={fraction}); {advice}")


def prepare(data: str, tokenizer, val_fraction: float = 0.0, num_workers: int = 0,
            max_docs: int = 0, cache_dir: str | os.PathLike | None = None,
            verbose: bool = True, *, out_dir: str | os.PathLike | None = None,
            max_tokens: int = 0, shard_tokens: int = 0, text_column: str = "text",
            split_by: str = "auto", loss_mask: str | None = None,
            hf_config: str | None = None, hf_split: str = "train", full: bool = False):
    """Tokenize ``data`` once into a shard folder (reused while data, tokenizer and options
    match) and return its ``Shards``; a folder ``prepare`` wrote is loaded as it is.

    ``data``: a dataset name (``tinystories``: its first ``data.PREFIX_BYTES`` unless
    ``full`` or the whole file is already there), a file, a folder, or ``hf:<id>`` (with
    ``hf_config``/``hf_split``, streamed). The val split is the source's val file when it has
    one; otherwise every document with index ``k`` where ``floor((k+1)f) > floor(kf)`` for
    ``f = val_fraction or 0.05``, so train and val never share a document.
    ``max_tokens`` stops after the document that reaches that many tokens (per set of files:
    the training source, and a separate val file); ``max_docs`` caps documents the same way.
    ``shard_tokens`` cuts train into numbered files of that many tokens (the reader joins
    them back into one stream). ``loss_mask`` (``response``/``completion``/``imitation``)
    stores which tokens of chat data are targets. ``num_workers=0`` uses every core.
    """
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction={val_fraction} must be in [0, 1)")
    for name, value in (("max_tokens", max_tokens), ("shard_tokens", shard_tokens),
                        ("max_docs", max_docs), ("num_workers", num_workers)):
        if not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}={value!r} must be an integer >= 0 (0: no limit)")
    if loss_mask is not None and loss_mask not in MODES:
        raise ValueError(f"loss_mask={loss_mask!r} is invalid; choose one of {', '.join(MODES)}, "
                         "or None for no mask")
    check_split_by(split_by)
    tokenizer = load_tokenizer(tokenizer)  # a Tokenizer passes through; a path or name loads
    if is_shard_folder(data):
        given = {k: v for k, v in (("val_fraction", val_fraction), ("max_docs", max_docs),
                                   ("max_tokens", max_tokens), ("shard_tokens", shard_tokens),
                                   ("loss_mask", loss_mask), ("text_column", text_column),
                                   ("split_by", split_by)) if v not in (0, 0.0, None, "text", "auto")}
        if given:
            raise ValueError(f"{data} is already prepared, so {given} cannot apply; prepare the "
                             "source again with them, or drop them")
        return _load_prepared(Path(data), tokenizer, verbose)
    train_src, val_src = resolve_text_files(data, full=full)
    train_src = [HubSource(s.name, hf_config, hf_split) if isinstance(s, HubSource) else s
                 for s in train_src]
    fraction = 0.0 if val_src else (val_fraction or DEFAULT_VAL_FRACTION)
    dtype = token_dtype(tokenizer.vocab_size)
    key = {"format": 1, "data": data, "files": _source_ids(train_src + val_src),
           "tokenizer_hash": tokenizer.hash, "max_docs": max_docs, "val_fraction": fraction}
    options = {"max_tokens": max_tokens, "shard_tokens": shard_tokens, "text_column": text_column,
               "split_by": split_by, "loss_mask": loss_mask}
    defaults = {"max_tokens": 0, "shard_tokens": 0, "text_column": "text", "split_by": "auto",
                "loss_mask": None}
    key.update({k: v for k, v in options.items() if v != defaults[k]})  # old caches stay valid
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    name = _cache_key_name(data)
    folder = Path(out_dir) if out_dir else _cache_root(cache_dir) / f"{name}-{digest}"
    if _is_done(folder, key):
        if verbose:
            tqdm.write(f"using cached shards {folder}")
        return Shards.load(folder)
    # the one rule for outputs the user names: a folder prepare wrote may be rewritten, a
    # folder holding anything else (the user's files, a run, the source) never
    local = [s for s in train_src + val_src if not isinstance(s, HubSource)]
    check_target(folder, "shards", overwrite=True, source=local, name="--out")
    folder.parent.mkdir(parents=True, exist_ok=True)
    # two trainings started on one corpus: one writes the folder, the other waits and reuses
    # it (the lock is a sibling: the folder itself is swapped in whole)
    lock = folder.parent / f".{folder.name}.lock"
    try:
        with waiting_lock(lock):
            if _is_done(folder, key):
                if verbose:
                    tqdm.write(f"using shards {folder}, prepared meanwhile by another process")
                return Shards.load(folder)
            check_target(folder, "shards", overwrite=True, source=local, name="--out")
            _write_folder(data, folder, key, tokenizer, train_src, val_src, fraction, dtype,
                          name, verbose, max_docs=max_docs, max_tokens=max_tokens,
                          shard_tokens=shard_tokens, text_column=text_column,
                          split_by=split_by, loss_mask=loss_mask, workers=num_workers)
    finally:  # not left in the user's folder; a process that waited on it finds the work done
        lock.unlink(missing_ok=True)
    return Shards.load(folder)


def _is_done(folder: Path, key: dict) -> bool:
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):  # none, or someone else's meta.json: not this prepare's
        return False
    return isinstance(meta, dict) and meta.get("key") == key


def _write_folder(data, folder, key, tokenizer, train_src, val_src, fraction, dtype, name,
                  verbose, *, max_docs, max_tokens, shard_tokens, text_column, split_by,
                  loss_mask, workers) -> None:
    """Tokenize the sources into a temp sibling of ``folder`` and swap it in whole
    (``outputs.staged``); ``meta.json`` is written last, so a folder with one is complete."""
    sets = [("train", train_src), ("val", val_src)] if val_src else [(None, train_src)]
    started = time.perf_counter()
    with staged(folder, "shards", data) as tmp:
        totals, files = _write_shards(data, tmp, tokenizer, sets, fraction, dtype, name,
                                      verbose, max_docs=max_docs, max_tokens=max_tokens,
                                      shard_tokens=shard_tokens, text_column=text_column,
                                      split_by=split_by, loss_mask=loss_mask, workers=workers)
        seconds = time.perf_counter() - started
        meta = {"key": key, "source": data, "tokenizer_hash": tokenizer.hash,
                "tokenizer_path": str(getattr(tokenizer, "path", "") or ""),
                "vocab_size": tokenizer.vocab_size, "dtype": dtype.name, "bos_eos": True,
                "split_by": "val file" if val_src else f"fraction {fraction}",
                "loss_mask": loss_mask, "files": files, "seconds": round(seconds, 2),
                **{field: {s: t[field] for s, t in totals.items()}
                   for field in ("tokens", "documents", "bytes")}}
        atomic_write_text(tmp / "meta.json", json.dumps(meta, indent=1))  # last: complete
    if verbose:
        mb = sum(t["bytes"] for t in totals.values()) / 1e6
        tqdm.write(f"shards in {folder}: " + ", ".join(
            f"{s} {t['tokens']:,} tokens / {t['documents']:,} docs in {len(files[s])} file(s)"
            for s, t in totals.items()) + f"; {mb:,.1f} MB of text in {seconds:.1f} s")


def _load_prepared(folder: Path, tokenizer, verbose: bool):
    shards = Shards.load(folder)
    if shards.meta.get("tokenizer_hash") != tokenizer.hash:
        raise ValueError(
            f"{folder} was prepared with tokenizer {shards.meta.get('tokenizer_path') or '?'} "
            f"(hash {str(shards.meta.get('tokenizer_hash'))[:12]}), not {tokenizer.path or 'this one'} "
            f"(hash {tokenizer.hash[:12]}); use that tokenizer or prepare the data again")
    if verbose:
        tqdm.write(f"using prepared shards {folder}")
    return shards


def _source_bytes(sets) -> int | None:
    """Bytes of plain-text source files, the progress bar's total; None (no total) for a Hub
    source or JSON/parquet, whose file bytes are not the text bytes the bar counts."""
    total = 0
    for _, sources in sets:
        for s in sources:
            if isinstance(s, HubSource):
                return None
            for f in folder_files(Path(s)) if Path(s).is_dir() else [Path(s)]:
                if f.suffix in (".jsonl", ".json", ".parquet"):
                    return None
                total += f.stat().st_size
    return total


def _write_shards(data, folder, tokenizer, sets, fraction, dtype, name, verbose, *, max_docs,
                  max_tokens, shard_tokens, text_column, split_by, loss_mask, workers):
    totals = {s: {"tokens": 0, "bytes": 0, "documents": 0} for s in ("train", "val")}
    spent = [0] * len(sets)  # tokens taken from each set of sources
    done: set[int] = set()
    workers = workers or os.cpu_count() or 1
    limited = bool(max_docs or max_tokens)
    bar_total = None if limited else _source_bytes(sets)
    started = time.perf_counter()
    with contextlib.ExitStack() as stack:
        writers = {s: _SplitWriter(folder, s, dtype, shard_tokens if s == "train" else 0,
                                   loss_mask is not None) for s in ("train", "val")}
        for w in writers.values():
            stack.callback(w.close)
        bar = stack.enter_context(tqdm(total=bar_total, unit="B", unit_scale=True,
                                       disable=not verbose, desc=f"tokenizing {name}"))
        tasks = _tasks(sets, fraction, max_docs, text_column, split_by, done)
        init_args = (type(tokenizer), tokenizer.to_bytes(), loss_mask)
        pool = get_context().Pool(workers, _init_worker, init_args) if workers > 1 else None
        if pool is None:
            _init_worker(*init_args)
        try:  # a bounded group of chunks at a time: Pool.imap alone would queue the whole corpus
            while group := list(itertools.islice(tasks, 4 * workers)):
                results = pool.imap(_encode_chunk, group) if pool else map(_encode_chunk, group)
                for g, is_val, ids, mask, lengths, n_bytes in results:
                    if g in done:
                        continue
                    n_docs = len(lengths)
                    if max_tokens and spent[g] + len(ids) >= max_tokens:
                        # keep documents up to and including the one that reaches the budget
                        n_docs = int(np.searchsorted(np.cumsum(lengths), max_tokens - spent[g])) + 1
                        done.add(g)
                    n_ids = int(lengths[:n_docs].sum())
                    ids = np.asarray(ids[:n_ids], dtype=dtype)
                    mask = None if mask is None else np.asarray(mask[:n_ids], np.uint8)
                    token_is_val = np.repeat(is_val[:n_docs], lengths[:n_docs])  # (n_ids,)
                    for split, sel in (("train", ~token_is_val), ("val", token_is_val)):
                        docs = is_val[:n_docs] == (split == "val")
                        if not docs.any():
                            continue
                        writers[split].write(ids[sel], None if mask is None else mask[sel])
                        t = totals[split]
                        t["tokens"] += int(sel.sum())
                        t["bytes"] += int(n_bytes[:n_docs][docs].sum())
                        t["documents"] += int(docs.sum())
                    spent[g] += n_ids
                    bar.update(int(n_bytes[:n_docs].sum()))
                    rate = (totals["train"]["tokens"] + totals["val"]["tokens"]) / max(
                        1e-9, time.perf_counter() - started)
                    bar.set_postfix_str(f"{rate:,.0f} tokens/s", refresh=False)
        finally:
            if pool is not None:
                pool.terminate()
        for split, t in totals.items():
            if t["tokens"] == 0:  # raised inside: the staging folder is removed
                raise ValueError(_empty_split_advice(data, split, totals, fraction, max_docs))
        files = {s: w.files for s, w in writers.items()}
        for w in writers.values():
            w.close()
    return totals, files
