"""Seed 000's training files: one JSON list of alternating user / assistant messages, read as
its query -> target pairs (one example per pair, a system message kept with its pair) by
``prepare``, ``sft`` and chat pretraining, in each of the modes response, completion and
imitation."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from minlm.chatdata import MODES, chat_examples, read_conversations
from minlm.prepare import prepare
from minlm.tokenizer import load_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")


def seed_pairs(n_pairs: int = 60, system_every: int = 10) -> list[dict]:
    """A flat message list as seed 000 wrote it; every ``system_every``-th pair has a system
    message in front (0: none)."""
    out = []
    for k in range(n_pairs):
        if system_every and k % system_every == 0:
            out.append({"role": "system", "content": f"Be kind ({k})."})
        out.append({"role": "user", "content": f"Tell me about cat number {k}."})
        out.append({"role": "assistant", "content": f"Cat {k} sat on the mat and purred."})
    return out


def _minlm(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MINLM_CACHE_DIR": str(cwd / "cache")}
    return subprocess.run([sys.executable, "-m", "minlm", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def test_prepare_splits_a_flat_message_list_by_its_pairs(tmp_path):
    """The issue's command on a 120-message file: it said the val split was empty."""
    messages = seed_pairs(60, system_every=0)
    assert len(messages) == 120
    (tmp_path / "pairs.json").write_text(json.dumps(messages))
    done = _minlm(["prepare", "pairs.json", "--tokenizer", "tinystories-512", "--out", "out"],
                  tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "out" / "meta.json").read_text())
    assert meta["documents"]["train"] + meta["documents"]["val"] == 60
    assert meta["documents"]["val"] > 0 and meta["tokens"]["val"] > 0


def test_each_pair_is_one_conversation_with_its_system_message(tmp_path):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(seed_pairs()))
    convs = read_conversations(path).examples
    assert len(convs) == 60
    assert [m["role"] for m in convs[0]] == ["system", "user", "assistant"]
    assert [m["role"] for m in convs[1]] == ["user", "assistant"]
    assert convs[11][0]["content"] == "Tell me about cat number 11."
    assert convs[10][0] == {"role": "system", "content": "Be kind (10)."}
    one = tmp_path / "one.json"  # the way to say "one conversation": {"messages": [...]}
    one.write_text(json.dumps({"messages": seed_pairs(3, system_every=10)}))
    assert len(read_conversations(one)) == 1


@pytest.mark.parametrize("messages, message", [
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}],
     r"pairs\.json, message 1: role 'user' where 'assistant' was expected .*\{\"messages\""),
    ([{"role": "assistant", "content": "a"}],
     r"message 0: role 'assistant' where 'system' or 'user' was expected"),
    ([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
      {"role": "user", "content": "c"}],
     r"message 2: the last user message has no assistant reply after it"),
])
def test_a_broken_pair_names_the_message(tmp_path, messages, message):
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(messages))
    with pytest.raises(ValueError, match=message):
        read_conversations(path)
    with pytest.raises(ValueError, match=message):
        prepare(str(path), "tinystories-512", out_dir=tmp_path / "out", num_workers=1,
                verbose=False)


def test_the_three_modes_still_choose_the_targets_of_each_pair(tmp_path):
    """SFT examples and the loss masks of chat pretraining, from the same pairs."""
    tok = load_tokenizer("tinystories-512")
    path = tmp_path / "pairs.json"
    path.write_text(json.dumps(seed_pairs()))
    convs = read_conversations(path).examples
    trained = {}
    for mode in MODES:
        examples, stats = chat_examples(tok, convs, mode=mode)
        assert stats.examples == 60
        trained[mode] = sum(sum(e.mask) for e in examples)
        shards = prepare(str(path), tok, out_dir=tmp_path / mode, num_workers=1,
                         loss_mask=mode, val_fraction=0.1, verbose=False)
        assert shards.meta["documents"] == {"train": 54, "val": 6}
        mask = np.concatenate([np.fromfile(p, dtype=np.uint8)
                               for p in sorted(shards.dir.glob("*.mask.bin"))])
        assert mask.sum() > 0
        trained[mode, "prepare"] = int(mask.sum())
    assert trained["response"] < trained["imitation"]  # imitation adds the user turns
    assert trained["completion"] < trained["imitation"]  # completion drops each turn's start
    assert trained["response", "prepare"] < trained["imitation", "prepare"]


def test_sft_trains_on_a_flat_message_list(tmp_path):
    """The CLI as a person runs it, with a mode other than the default."""
    (tmp_path / "pairs.json").write_text(json.dumps(seed_pairs()))
    repo_runs = os.path.join(os.path.dirname(__file__), "..", "trained_models")
    done = _minlm(["sft", os.path.join(repo_runs, "llama-1m-chat"), "--data", "pairs.json",
                   "mode=imitation", "max_steps=2", "batch_size=4", "eval_interval=2",
                   f"out_dir={tmp_path / 'runs'}", "run_name=tuned"], tmp_path)
    assert done.returncode == 0, done.stderr
    meta = json.loads((tmp_path / "runs" / "tuned" / "train_config.json").read_text())["meta"]
    assert meta["finetune"]["mode"] == "imitation"
    assert "60" in json.dumps(meta)  # the 60 pairs are its examples (train + val)
