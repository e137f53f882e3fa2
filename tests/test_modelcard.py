"""Model cards: figures from the run's record, bits per byte measured, three samples."""

import re
import shutil

import pytest

from minlm.evaluate import evaluate_file
from minlm.modelcard import write_model_card
from minlm.runs import load_run, read_configs, save_configs
from minlm.train import tiny_run


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("MINLM_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
    yield tiny_run(tmp_path_factory.mktemp("runs"), "tiny", steps=6)
    mp.undo()


def test_story_card(run_dir, shared_data, tmp_path):
    stories = (shared_data / "tinystories" / "valid.txt").read_text().split("<|endoftext|>")
    valid = tmp_path / "valid.txt"
    valid.write_text("<|endoftext|>".join(stories[:20]))
    text = write_model_card(run_dir, valid, max_new_tokens=8).read_text()
    run = load_run(run_dir)
    assert text.startswith("# tiny\n")
    assert f"A {run.model.num_params():,}-parameter `llama-1m` model" in text
    bpb = evaluate_file(run.model, run.tokenizer, valid).bits_per_byte
    assert f"| bits per byte on `valid.txt` (every token) | **{bpb:.4f}** |" in text
    assert "| steps | 6 |" in text and ("threads (cpu) |" in text or "1 thread (cpu) |" in text)
    assert len(re.findall(r"^> \*\*", text, flags=re.M)) == 3  # three samples


def test_chat_card_shows_conversations(run_dir, tmp_path):
    chat_dir = tmp_path / "tiny-sft"
    shutil.copytree(run_dir, chat_dir)
    model_cfg, train_cfg, meta = read_configs(chat_dir)
    save_configs(chat_dir, model_cfg, train_cfg, {**meta, "kind": "sft", "parent": str(run_dir)})
    text = write_model_card(chat_dir, max_new_tokens=8).read_text()
    assert "Fine-tuned from `tiny`" in text
    assert text.count("> **User:**") == 3 and "python -m minlm chat tiny-sft" in text


def test_hardware_names_the_cpu_threads_in_words():
    import torch

    from minlm.runs import hardware

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        assert hardware(torch.device("cpu")).endswith(", 1 thread (cpu)")
        torch.set_num_threads(2)
        assert hardware(torch.device("cpu")).endswith(", 2 threads (cpu)")
    finally:
        torch.set_num_threads(before)
