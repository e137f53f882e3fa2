"""Data: reading documents, shards that hold exactly the source's tokens, reproducible batches."""

from __future__ import annotations

import itertools
import json
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

from minlm import data
from minlm.data import (
    get_batch,
    iter_eval_batches,
    read_documents,
    resolve_text_files,
    token_dtype,
)
from minlm.prepare import prepare
from minlm.tokenizer import load_tokenizer


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tinystories-512")


def first_docs(path, n):
    return list(itertools.islice(read_documents(path), n))


def flat(tok, docs):
    return [i for d in docs for i in tok.encode(d, bos=True, eos=True)]


def test_read_documents_formats(shared_data, tmp_path):
    valid = list(read_documents(shared_data / "tinystories" / "valid.txt"))
    assert len(valid) == 705 and all("<|endoftext|>" not in d and d.strip() for d in valid)
    assert valid[0] == valid[0].strip("\n")

    plain = tmp_path / "plain.txt"  # no separator line: paragraphs are documents
    plain.write_text("First one.\nStill first.\n\n\nSecond.\n\n")
    assert list(read_documents(plain)) == ["First one.\nStill first.", "Second."]

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n\n{"text": "two", "id": 2}\n')
    assert list(read_documents(tmp_path / "a.jsonl")) == ["one", "two"]
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, "y"]))
    assert list(read_documents(tmp_path / "a.json")) == ["x", "y"]

    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.table({"text": ["p1", "p2"], "n": [1, 2]}), tmp_path / "a.parquet")
    assert list(read_documents(tmp_path / "a.parquet")) == ["p1", "p2"]


def test_read_documents_errors(shared_data, tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.txt does not exist"):
        list(read_documents(tmp_path / "missing.txt"))
    (tmp_path / "empty.txt").write_text("\n  \n")
    with pytest.raises(ValueError, match="empty.txt holds no documents"):
        list(read_documents(tmp_path / "empty.txt"))
    (tmp_path / "blob.txt").write_bytes(bytes(range(256)) * 4)
    with pytest.raises(ValueError, match="blob.txt is not a UTF-8 text file"):
        list(read_documents(tmp_path / "blob.txt"))
    (tmp_path / "latin1.txt").write_bytes("café\n".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt is not a UTF-8 text file"):
        list(read_documents(tmp_path / "latin1.txt"))
    with pytest.raises(ValueError, match=r"sft.jsonl, line 1 is a chat conversation, not text"):
        next(read_documents(shared_data / "chat" / "hh_rlhf_helpful_sft.jsonl"))


def test_resolve_text_files(shared_data, tmp_path):
    train, val = resolve_text_files("tinystories")
    assert train == [shared_data / "tinystories" / "train.txt"]
    assert val == [shared_data / "tinystories" / "valid.txt"]
    assert resolve_text_files("shakespeare") == ([shared_data / "shakespeare" / "input.txt"], [])
    f = shared_data / "tinystories" / "valid.txt"
    assert resolve_text_files(str(f)) == ([f], [])
    assert resolve_text_files(str(shared_data / "tinystories")) == (train, val)
    with pytest.raises(FileNotFoundError, match=r"data='nonsense'.*tinystories, shakespeare"):
        resolve_text_files("nonsense")
    (tmp_path / "x.csv").write_text("a")
    with pytest.raises(ValueError, match=r"suffix '\.csv'.*\.txt"):
        resolve_text_files(str(tmp_path / "x.csv"))


def test_offline_download_error(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setenv("MINLM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(RuntimeError, match="set MINLM_DATA_DIR to a folder.*tinystories/train.txt"):
        resolve_text_files("tinystories")
    assert not list((tmp_path / "tinystories").glob("*"))  # no partial file left behind


def test_prepare_with_val_file_holds_exact_tokens(shared_data, tmp_path, tok):
    shards = prepare("tinystories", tok, max_docs=30, num_workers=1, cache_dir=tmp_path,
                     verbose=False)
    train_docs = first_docs(shared_data / "tinystories" / "train.txt", 30)
    val_docs = first_docs(shared_data / "tinystories" / "valid.txt", 30)
    assert shards.train.dtype == np.uint16
    assert shards.train.tolist() == flat(tok, train_docs)
    assert shards.val.tolist() == flat(tok, val_docs)
    meta = shards.meta
    assert meta["tokenizer_hash"] == tok.hash and meta["dtype"] == "uint16"
    assert meta["documents"] == {"train": 30, "val": 30}
    assert meta["bytes"]["val"] == sum(len(d.encode()) for d in val_docs)
    assert shards.bytes_per_token("val") == meta["bytes"]["val"] / len(shards.val)
    stamp = (shards.dir / "meta.json").stat().st_mtime_ns
    again = prepare("tinystories", tok, max_docs=30, num_workers=1, cache_dir=tmp_path,
                    verbose=False)
    assert again.dir == shards.dir and (again.dir / "meta.json").stat().st_mtime_ns == stamp
    other = prepare("tinystories", tok, max_docs=20, num_workers=1, cache_dir=tmp_path,
                    verbose=False)
    assert other.dir != shards.dir and other.meta["documents"]["train"] == 20


def test_prepare_splits_by_fraction_disjointly(shared_data, tmp_path, tok):
    docs = first_docs(shared_data / "tinystories" / "train.txt", 80)
    src = tmp_path / "stories.txt"
    src.write_text("".join(d + "\n<|endoftext|>\n" for d in docs))
    shards = prepare(str(src), tok, val_fraction=0.1, num_workers=2, cache_dir=tmp_path / "c",
                     verbose=False)

    def split_docs(tokens):  # documents back from a shard: cut after every EOS
        ids, out = tokens.tolist(), []
        while ids:
            end = ids.index(tok.eos_id) + 1
            out.append(tok.decode(ids[:end]))
            ids = ids[end:]
        return out

    train, val = split_docs(shards.train), split_docs(shards.val)
    assert len(val) == 8 and len(train) == 72
    assert not set(train) & set(val) and sorted(train + val) == sorted(docs)
    assert shards.meta["documents"] == {"train": 72, "val": 8}
    in_process = prepare(str(src), tok, val_fraction=0.1, num_workers=1,
                         cache_dir=tmp_path / "c2", verbose=False)
    assert np.array_equal(in_process.train, shards.train)  # the pool changes nothing
    with pytest.raises(ValueError, match="val split .* is empty"):
        prepare(str(src), tok, max_docs=5, num_workers=1, cache_dir=tmp_path / "c3",
                verbose=False)


def test_token_dtype():
    assert token_dtype(4096) == np.uint16
    assert token_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert token_dtype(65537) == np.uint32
    assert token_dtype(151_936) == np.uint32


def test_get_batch_shapes_shift_and_reproducible():
    tokens = np.arange(1000, dtype=np.uint16)
    g = torch.Generator().manual_seed(0)
    state = g.get_state()
    x, y = get_batch(tokens, 4, 16, g)
    assert x.shape == y.shape == (4, 16) and x.dtype == y.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1]) and torch.equal(y, x + 1)
    x2, _ = get_batch(tokens, 4, 16, g)
    assert not torch.equal(x, x2)
    g.set_state(state)
    x3, y3 = get_batch(tokens, 4, 16, g)
    assert torch.equal(x, x3) and torch.equal(y, y3)
    assert get_batch(tokens, 2, 999, g)[0].shape == (2, 999)  # the longest window that fits
    with pytest.raises(ValueError, match=r"holds 1000 tokens, fewer than block_size\+1=1001"):
        get_batch(tokens, 2, 1000, g)


def test_iter_eval_batches_cover_the_split():
    tokens = np.arange(103, dtype=np.uint16)
    batches = list(iter_eval_batches(tokens, batch_size=3, block_size=10))
    assert [tuple(x.shape) for x, _ in batches] == [(3, 10), (3, 10), (3, 10), (1, 10), (1, 2)]
    xs = torch.cat([x.flatten() for x, _ in batches])
    ys = torch.cat([y.flatten() for _, y in batches])
    assert xs.tolist() == list(range(102)) and ys.tolist() == list(range(1, 103))


def test_data_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("MINLM_DATA_DIR", str(tmp_path))
    assert data.data_dir() == tmp_path


def test_download_writes_the_file_when_online(tmp_path, monkeypatch):
    import io

    def fake_urlopen(url, timeout):
        response = io.BytesIO(b"To be, or not to be.\n\nAy.")
        response.headers = {"Content-Length": "26"}
        return response

    monkeypatch.setenv("MINLM_DATA_DIR", str(tmp_path))
    monkeypatch.setattr(urllib.request, "urlopen", fake_urlopen)
    train, val = resolve_text_files("shakespeare")
    assert train == [tmp_path / "shakespeare" / "input.txt"] and val == []
    assert list(read_documents(train[0])) == ["To be, or not to be.", "Ay."]
