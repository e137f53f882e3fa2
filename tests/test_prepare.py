"""prepare: every seed format, shards that read back as one stream, token budgets, the Hub
loader offline, chat pretraining with a loss mask, the CLI and an interrupted prepare."""

from __future__ import annotations

import http.server
import itertools
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from minlm import data as data_mod
from minlm.chatdata import parse_chat, read_conversations, render_chat
from minlm.config import ModelConfig, TrainConfig
from minlm.data import Shards, get_batch, read_documents
from minlm.prepare import prepare
from minlm.runs import load_run, read_log
from minlm.tokenizer import load_tokenizer
from minlm.train import StopFlag, train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")

CHAT = [{"role": "user", "content": "Hi there, who are you?"},
        {"role": "assistant", "content": "I am a tiny model. How can I help?"},
        {"role": "user", "content": "Tell me a story."},
        {"role": "assistant", "content": "Once upon a time there was a cat."}]


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer("tinystories-512")


def stories(shared_data, n):
    return list(itertools.islice(read_documents(shared_data / "tinystories" / "train.txt"), n))


def run(tmp_path, source, tok, **kw):
    kw.setdefault("num_workers", 1)
    return prepare(str(source), tok, out_dir=tmp_path / "out", verbose=False, **kw)


def docs_of(tokens, tok):
    ids, out = list(tokens), []
    while ids:
        end = ids.index(tok.eos_id) + 1
        out.append(ids[:end])
        ids = ids[end:]
    return out


# --- the seed formats --------------------------------------------------------------------

def test_flat_message_list_and_folder_of_json(tmp_path, tok):
    """Seed 000: a .json file that is one flat list of {content, role} messages (read as its
    user -> assistant pairs), and a folder of such files, load for SFT (read_conversations)
    and for pretraining (prepare)."""
    folder = tmp_path / "chats"
    folder.mkdir()
    for k in range(40):
        flat = [{"content": m["content"] + f" ({k})", "role": m["role"]} for m in CHAT]
        (folder / f"conv{k:02d}.json").write_text(json.dumps(flat))
    one = read_conversations(folder / "conv00.json")
    assert len(one) == 2 and one[0][1]["content"] == CHAT[1]["content"] + " (0)"
    assert one[1][0]["content"] == CHAT[2]["content"] + " (0)"
    assert len(read_conversations(folder)) == 80  # a folder of .json files, two pairs each

    shards = run(tmp_path, folder, tok, val_fraction=0.1)
    assert shards.meta["documents"] == {"train": 72, "val": 8}
    chat = tok.chat_tokens
    first = docs_of(shards.train, tok)[0]
    assert first[0] == tok.bos_id and first[1] == chat["user"] and first[-1] == tok.eos_id
    assert first[:-1] == render_chat(tok, one[0])  # the chat template, then EOS


def test_line_per_example_text_gets_a_val_split(tmp_path, tok):
    """The Alilama seed's translation file: one example per line, no blank lines."""
    src = tmp_path / "pairs.txt"
    src.write_text("".join(f"ENGLISH: I see {k} cats. GERMAN: Ich sehe {k} Katzen.\n"
                           for k in range(60)))
    with pytest.raises(ValueError, match="val split .* empty .*one example per line.*"
                       "split_by='line'"):
        run(tmp_path / "a", src, tok)
    shards = run(tmp_path / "b", src, tok, split_by="line", val_fraction=0.1)
    assert shards.meta["documents"] == {"train": 54, "val": 6}
    assert tok.decode(docs_of(shards.val, tok)[0]).startswith("ENGLISH: I see 9 cats.")


def test_parquet_messages_column_and_text_column(tmp_path, tok):
    message = pa.struct([("role", pa.string()), ("content", pa.string())])
    pq.write_table(pa.table({"messages": pa.array([CHAT] * 30, type=pa.list_(message))}),
                   tmp_path / "chat.parquet")
    shards = run(tmp_path / "a", tmp_path / "chat.parquet", tok)
    assert sum(shards.meta["documents"].values()) == 30
    assert parse_chat(tok, docs_of(shards.train, tok)[0]) == CHAT

    pq.write_table(pa.table({"body": [f"story {k}" for k in range(30)]}), tmp_path / "t.parquet")
    with pytest.raises(ValueError, match=r"t.parquet has no 'text' column .*\['body'\].*"
                       "--text-column"):
        run(tmp_path / "b", tmp_path / "t.parquet", tok)
    shards = run(tmp_path / "c", tmp_path / "t.parquet", tok, text_column="body")
    assert tok.decode(docs_of(shards.train, tok)[0]) == "story 0"


def test_clear_errors(tmp_path, tok):
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "a.txt").write_text("hello\n")
    (mixed / "b.jsonl").write_text('{"text": "x"}\n')
    with pytest.raises(ValueError, match=r"mixed mixes formats \(\.jsonl e\.g\. b\.jsonl, "
                       r"\.txt e\.g\. a\.txt\)"):
        run(tmp_path, mixed, tok)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty holds no data files"):
        run(tmp_path, tmp_path / "empty", tok)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": CHAT}) + "\n"
                   + json.dumps({"messages": [{"role": "user", "text": "no content"}]}) + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl, line 2: message 0 \(user\) has content "
                       "of type NoneType"):
        run(tmp_path, bad, tok)
    (tmp_path / "rows.jsonl").write_text('{"body": "x", "id": 1}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl, line 1: has no 'text' field .*"
                       r"\['body', 'id'\].*--text-column"):
        run(tmp_path, tmp_path / "rows.jsonl", tok)
    with pytest.raises(ValueError, match="loss_mask='all' is invalid; choose one of response"):
        run(tmp_path, bad, tok, loss_mask="all")


# --- size: shards, budgets, resume ---------------------------------------------------------

def test_one_and_three_shards_give_the_same_stream(shared_data, tmp_path, tok):
    src = tmp_path / "stories.txt"
    src.write_text("".join(d + "\n<|endoftext|>\n" for d in stories(shared_data, 200)))
    one = run(tmp_path / "one", src, tok)
    n = len(one.train)
    three = run(tmp_path / "three", src, tok, shard_tokens=n // 3 + 1, num_workers=2)
    assert [k for _, k in three.meta["files"]["train"]] == [n // 3 + 1] * 2 + [n - 2 * (n // 3 + 1)]
    assert sorted(p.name for p in three.dir.glob("train-*.bin")) == [
        "train-00000.bin", "train-00001.bin", "train-00002.bin"]
    assert three.train.tolist() == one.train.tolist()
    assert np.array_equal(three.val, one.val)
    g1, g3 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    for _ in range(20):  # random windows, many across a shard boundary: the same batches
        x1, y1 = get_batch(one.train, 8, 64, g1)
        x3, y3 = get_batch(three.train, 8, 64, g3)
        assert torch.equal(x1, x3) and torch.equal(y1, y3)
    states = [torch.Generator().manual_seed(5) for _ in range(3)]
    whole = get_batch(three.train, 8, 64, states[0])[0]
    ranks = [get_batch(three.train, 8, 64, states[r + 1], shard=(r, 2))[0] for r in range(2)]
    assert torch.equal(torch.cat(ranks), whole)  # DDP ranks: distinct rows of one global batch
    edge = n // 3 + 1
    assert three.train[edge - 2:edge + 2].tolist() == one.train[edge - 2:edge + 2].tolist()


def test_max_tokens_stops_within_one_document(shared_data, tmp_path, tok):
    src = tmp_path / "stories.txt"
    src.write_text("".join(d + "\n<|endoftext|>\n" for d in stories(shared_data, 300)))
    budget = 12_000
    shards = run(tmp_path, src, tok, max_tokens=budget, shard_tokens=2_000, num_workers=2,
                 val_fraction=0.1)
    total = len(shards.train) + len(shards.val)
    last_doc = len(docs_of(shards.train, tok)[-1])
    assert budget <= total < budget + last_doc
    everything = run(tmp_path / "all", src, tok, val_fraction=0.1)
    assert shards.train.tolist() == everything.train[:len(shards.train)].tolist()  # a prefix
    assert shards.meta["documents"]["train"] < everything.meta["documents"]["train"]


def tiny(vocab=512):
    return ModelConfig.from_preset("llama-0.5m", vocab_size=vocab, dim=32, n_layers=2,
                                   n_heads=2, n_kv_heads=1, block_size=32)


def tiny_train(out, data, **kw):
    base = dict(run_name="tiny", out_dir=str(out), data=str(data), tokenizer="tinystories-512",
                max_iters=16, batch_size=4, lr=3e-3, warmup_iters=2, eval_interval=8,
                eval_iters=2, log_interval=4, checkpoint_interval=100, verbose=False,
                num_workers=1)
    return TrainConfig(**{**base, **kw})


@pytest.mark.numerics
def test_resume_across_shard_boundaries_is_exact(shared_data, tmp_path, tok):
    """Training reads a prepared folder of many small shards directly (data=<folder>), and
    stopping then resuming gives the same weights as one straight run."""
    src = tmp_path / "stories.txt"
    src.write_text("".join(d + "\n<|endoftext|>\n" for d in stories(shared_data, 120)))
    shards = run(tmp_path, src, tok, shard_tokens=1_000)
    assert len(shards.meta["files"]["train"]) > 10
    straight = train(tiny(), tiny_train(tmp_path / "a", shards.dir))
    stop = StopFlag()

    def stop_at_8(row):
        if row["step"] >= 8:
            stop.set("test stop")

    cfg = tiny_train(tmp_path / "b", shards.dir)
    first = train(tiny(), cfg, stop=stop, callbacks=[stop_at_8])
    assert first.step == 8
    resumed = train(tiny(), cfg.replace(resume=True))
    assert resumed.step == 16
    with pytest.raises(ValueError, match=r"already prepared, so \{'max_docs': 50\} cannot apply"):
        train(tiny(), tiny_train(tmp_path / "c", shards.dir, max_docs=50))
    with pytest.raises(ValueError, match="prepared with tokenizer .* not .*tinystories-1024"):
        prepare(str(shards.dir), "tinystories-1024", verbose=False)
    a, b = (load_run(r.run_dir).model.state_dict() for r in (straight, resumed))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- chat for pretraining ------------------------------------------------------------------

def test_pretraining_on_chat_with_a_response_mask_lowers_the_loss(shared_data, tmp_path, tok):
    sft = shared_data / "chat" / "hh_rlhf_helpful_sft.jsonl"
    shards = run(tmp_path, sft, tok, max_tokens=60_000, loss_mask="response", num_workers=2)
    assert (shards.dir / "train.mask.bin").is_file()
    x, y = get_batch(shards.train, 8, 64, torch.Generator().manual_seed(0))
    masked = y == -100
    assert masked.any() and (~masked).any()
    chat = tok.chat_tokens
    assert masked[x == chat["user"]].all()  # user text (after <|user|>) is never a target
    assert not masked[x == chat["assistant"]].any()  # the reply (after <|assistant|>) is

    result = train(tiny(), tiny_train(tmp_path / "runs", shards.dir, max_iters=40,
                                      eval_interval=20, log_interval=5))
    log = read_log(result.run_dir)
    first, last = log["train_loss"].iloc[0], log["train_loss"].iloc[-3:].mean()
    assert last < first - 0.5, (first, last)


def test_train_on_a_chat_file_directly(shared_data, tmp_path, monkeypatch):
    """``train data=...sft.jsonl`` used to fail ("no string 'text' field")."""
    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path / "cache"))
    sft = shared_data / "chat" / "hh_rlhf_helpful_sft.jsonl"
    result = train(tiny(), tiny_train(tmp_path, sft, max_docs=200, max_iters=2, eval_interval=2))
    assert result.step == 2
    meta = json.loads((result.run_dir / "train_config.json").read_text())["meta"]["data_meta"]
    assert meta["documents"]["train"] + meta["documents"]["val"] == 200


# --- the Hugging Face loader, offline ------------------------------------------------------

def test_hub_loader_streams_a_local_parquet_offline(tmp_path, tok, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    folder = tmp_path / "hubset" / "data"
    folder.mkdir(parents=True)
    texts = [f"Once upon a time, story number {k} began." for k in range(50)]
    pq.write_table(pa.table({"text": texts, "id": list(range(50))}), folder / "train.parquet")
    hub = prepare(f"hf:{tmp_path / 'hubset'}", tok, out_dir=tmp_path / "hub", verbose=False,
                  num_workers=1, max_tokens=700, val_fraction=0.1)
    assert hub.meta["key"]["files"] == [[f"hf:{tmp_path / 'hubset'} [train]"]]
    local = run(tmp_path, folder / "train.parquet", tok, max_tokens=700, val_fraction=0.1)
    assert hub.train.tolist() == local.train.tolist() and hub.val.tolist() == local.val.tolist()
    assert sum(hub.meta["documents"].values()) < 50  # the budget stopped the stream early

    with pytest.raises(RuntimeError, match="could not open the Hugging Face dataset "
                       "'nobody/no-such-set'.*offline.*prepare path/to/folder"):
        prepare("hf:nobody/no-such-set", tok, out_dir=tmp_path / "x", verbose=False)
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(RuntimeError, match="needs the 'datasets' package: pip install"):
        prepare("hf:nobody/no-such-set", tok, out_dir=tmp_path / "y", verbose=False)


# --- the first run on a fresh machine: a bounded prefix ------------------------------------

def test_named_corpus_downloads_a_bounded_prefix_once(tmp_path, monkeypatch):
    body = "".join(f"Story {k}: a cat sat on a mat.\n<|endoftext|>\n" for k in range(2000))
    requests = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - the stdlib's name
            requests.append(self.path)
            payload = body.encode()
            self.send_response(200)
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/big.txt"
        monkeypatch.setattr(data_mod, "DATASETS", {"big": {"train": ("train.txt", url)}})
        monkeypatch.setattr(data_mod, "PREFIX_BYTES", 10_000)
        monkeypatch.setenv("MINLM_DATA_DIR", str(tmp_path))
        train_files, _ = data_mod.resolve_text_files("big", full=False)
        assert train_files == [tmp_path / "big" / "train.first1MB.txt"]
        text = train_files[0].read_text()
        assert 9_000 < len(text) <= 10_000 and text.endswith("<|endoftext|>\n")
        assert not (tmp_path / "big" / "train.txt").exists()
        assert data_mod.resolve_text_files("big", full=False) == (train_files, [])
        assert len(requests) == 1  # cached for the next run
        full, _ = data_mod.resolve_text_files("big", full=True)
        assert full[0].read_text() == body and len(requests) == 2
    finally:
        server.shutdown()


# --- the command line, and an interrupted prepare ------------------------------------------

def _cli(*args, env=None):
    return subprocess.run([sys.executable, "-m", "minlm", "prepare", *args], cwd=REPO,
                          capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_cli_prepare_then_interrupted_prepare_is_not_trusted(shared_data, tmp_path):
    src = shared_data / "shakespeare" / "input.txt"
    out = tmp_path / "shk"
    done = _cli(str(src), "--tokenizer", "tinystories-512", "--out", str(out), "--max-tokens",
                "30K", "--shard-tokens", "10K", "--workers", "1")
    assert done.returncode == 0, done.stderr
    assert f"prepared {out}" in done.stdout and "train: " in done.stdout
    shards = Shards.load(out)
    assert len(shards.meta["files"]["train"]) == 3
    assert "tokens/s" in done.stderr  # the progress bar

    killed = _cli(str(src), "--tokenizer", "tinystories-512", "--out", str(out),
                  "--max-tokens", "20K", "--workers", "1",
                  env={"MINLM_CRASH_DURING_WRITE": "meta.json"})
    assert killed.returncode == -9
    # the new folder never landed, and the old one is whole: it is replaced only when complete
    assert len(Shards.load(out).meta["files"]["train"]) == 3
    assert [p.name for p in tmp_path.iterdir() if ".shk.staging-" in p.name]  # the kill's temp
    again = _cli(str(src), "--tokenizer", "tinystories-512", "--out", str(out),
                 "--max-tokens", "20K", "--workers", "1")
    assert again.returncode == 0, again.stderr
    assert Shards.load(out).meta["files"]["train"] == [["train.bin", len(Shards.load(out).train)]]
    assert sorted(p.name for p in out.iterdir()) == ["meta.json", "minlm-output.json",
                                                     "train.bin", "val.bin"]
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".shk")]  # cleared
    missing = _cli(str(tmp_path / "nope.txt"), "--tokenizer", "tinystories-512")
    assert missing.returncode == 2 and "nope.txt" in missing.stderr


def _waits_for_lock(pid: int) -> bool:
    """True when process ``pid`` is blocked waiting for a flock (a ``->`` line of /proc/locks)."""
    return any(line.split()[1] == "->" and line.split()[5] == str(pid)
               for line in Path("/proc/locks").read_text().splitlines() if "->" in line)


@pytest.mark.skipif(not Path("/proc/locks").exists(), reason="needs Linux's /proc/locks")
def test_a_second_prepare_of_one_folder_waits_for_the_first(shared_data, tmp_path):
    """Two trainings started on one corpus prepare the same cache folder. The second used to
    delete the first one's temp files (taking them for a killed prepare's) and write beside
    it; now it waits for the first one's lock, then uses or writes the folder."""
    import fcntl
    import time

    out = tmp_path / "shk"
    busy = tmp_path / f".shk.staging-{os.getpid()}-first" / "train.bin"  # the first one's work
    busy.parent.mkdir()
    busy.write_bytes(b"half a shard")
    ended = subprocess.Popen(["true"])  # a writer that has died: its pid is free
    ended.wait()
    dead = tmp_path / f".shk.staging-{ended.pid}-x"
    dead.mkdir()
    with open(tmp_path / ".shk.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # the first prepare, at work
        second = subprocess.Popen(
            [sys.executable, "-m", "minlm", "prepare", str(shared_data / "shakespeare" /
             "input.txt"), "--tokenizer", "tinystories-512", "--out", str(out),
             "--max-tokens", "20K", "--workers", "1"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 90
        while not _waits_for_lock(second.pid) and second.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert second.poll() is None and _waits_for_lock(second.pid), second.communicate()
        assert busy.exists()  # the first one's file is left alone while it holds the lock
        fcntl.flock(lock, fcntl.LOCK_UN)  # the first one gave up without finishing
    stdout, stderr = second.communicate(timeout=120)
    assert second.returncode == 0, stderr
    assert Shards.load(out).meta["tokens"]["train"] > 0
    assert busy.exists() and not dead.exists()  # a live writer's staging stays, a dead one's goes



def test_prepare_holds_one_shard_open_however_many_it_writes(tmp_path):
    """Was: every shard stayed open until the end (~1000 shards: Errno 24, too many open
    files). Here 200 shards are written under a limit of 64 open files."""
    import resource

    src = tmp_path / "many.txt"
    src.write_text("".join(f"Once upon a time Tom{i} saw a big red ball.\n\n" for i in range(150)))

    def few_files():  # in the child: a low ulimit -n
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))

    out = tmp_path / "many"
    done = subprocess.run([sys.executable, "-m", "minlm", "prepare", str(src), "--tokenizer",
                           "tinystories-512", "--out", str(out), "--shard-tokens", "10",
                           "--workers", "1"], cwd=REPO, capture_output=True, text=True,
                          timeout=300, preexec_fn=few_files, check=False)
    assert done.returncode == 0, done.stderr
    files = Shards.load(out).meta["files"]["train"]
    assert len(files) > 150 and len(list(out.glob("train-*.bin"))) == len(files)


def test_a_huge_single_line_is_refused_before_it_is_read(tmp_path):
    """Was: a 50 MB file without line breaks took 2.4 GB before it was refused."""
    import resource

    src = tmp_path / "one-line.txt"
    with open(src, "w") as f:
        for _ in range(50):
            f.write("the cat sat on the mat " * 45_000)  # ~1 MB per write, no newline
    done = subprocess.run([sys.executable, "-m", "minlm", "prepare", str(src), "--tokenizer",
                           "tinystories-512", "--out", str(tmp_path / "o"), "--workers", "1"],
                          cwd=REPO, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == 2, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.startswith("error")]
    assert len(lines) == 1 and f"{src}, line 1: a document longer than" in lines[0]
    assert "--split-by line" in lines[0] or "blank lines" in lines[0]
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    assert peak_mb < 1500, peak_mb  # the largest child so far (imports included), not 2.4 GB
    assert not (tmp_path / "o").exists()
