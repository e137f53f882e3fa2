"""The one training engine: the same policies for pretraining, SFT and DPO (non-finite
losses, failed exits, one log format), the run-folder lock and staged overwrite, init_from,
epochs and keep_best."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from minlm import LM, ModelConfig, TrainConfig, runs
from minlm.chatdata import write_conversations
from minlm.config import ConfigError
from minlm.finetune import DPOConfig, SFTConfig, dpo, sft
from minlm.runfolder import RunFolder
from minlm.tokenizer import load_tokenizer
from minlm.train import StopFlag, train

pytestmark = pytest.mark.usefixtures("one_thread", "shard_cache")

CONVS = [[{"role": "user", "content": f"What colour is the {thing}?"},
          {"role": "assistant", "content": f"The {thing} is {colour}."}]
         for thing, colour in [("sky", "blue"), ("grass", "green"), ("sun", "yellow")]] * 4


def model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=512, dim=16, n_layers=1, n_heads=2, n_kv_heads=0, block_size=64,
                multiple_of=8)
    return ModelConfig.from_preset("llama-1m", **{**base, **kw})


def train_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(run_name="tiny", out_dir=str(tmp_path), max_iters=8, batch_size=4,
                warmup_iters=2, eval_interval=4, eval_iters=2, log_interval=2,
                checkpoint_interval=4, max_docs=300, verbose=False, num_workers=1)
    return TrainConfig(**{**base, **kw})


def make_parent(tmp_path, poison: bool = False):
    """A run folder with an untrained tiny model; ``poison`` fills one weight with NaN."""
    tok = load_tokenizer("tinystories-512")
    torch.manual_seed(0)
    model = LM(model_cfg())
    if poison:
        with torch.no_grad():
            model.blocks[0].mixer.q_proj.weight.fill_(float("nan"))
    run_dir = tmp_path / "runs" / ("nan" if poison else "base")
    run_dir.mkdir(parents=True)
    runs.save_configs(run_dir, model.config, TrainConfig(preset="llama-1m"),
                      meta={"tokenizer_hash": tok.hash, "params": model.num_params()})
    runs.save_weights(run_dir, model)
    runs.copy_tokenizer(run_dir, tok)
    return run_dir


def chat_files(tmp_path):
    write_conversations(CONVS, tmp_path / "chat.jsonl")
    with open(tmp_path / "pairs.jsonl", "w") as f:
        for c in CONVS:
            f.write(json.dumps({"prompt": c[:1], "chosen": c[1]["content"],
                                "rejected": "No idea."}) + "\n")
    return tmp_path / "chat.jsonl", tmp_path / "pairs.jsonl"


def run_objective(kind: str, tmp_path, parent, **kw):
    chat, pairs = chat_files(tmp_path)
    if kind == "pretrain":
        return train(model_cfg(), train_cfg(tmp_path, init_from=str(parent), **kw))
    fn, data = (sft, chat) if kind == "sft" else (dpo, pairs)
    return fn(parent, data, epochs=2, batch_size=4, verbose=False, **kw)


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_one_engine_trains_each_objective_with_one_log_format(kind, tmp_path):
    result = run_objective(kind, tmp_path, make_parent(tmp_path))
    assert result.exit_code == 0 and result.status == "finished"
    log = runs.read_log(result.run_dir)
    assert list(log.columns[:len(runs.LOG_COLUMNS)]) == runs.LOG_COLUMNS
    assert log["train_loss"].dropna().map(math.isfinite).all() and result.step > 0
    assert runs.list_checkpoints(result.run_dir)  # every objective checkpoints
    saved = json.loads((result.run_dir / "train_config.json").read_text())
    assert "out_dir" not in saved and runs.absolute_paths(saved) == []  # the folder travels
    assert saved["meta"]["data_files"][0]["sha256"]
    if kind == "pretrain":
        assert log["train_bpb"].dropna().gt(0).all() and len(log["train_bpb"].dropna())


@pytest.mark.parametrize("kind", ["pretrain", "sft", "dpo"])
def test_non_finite_losses_fail_the_run_the_same_way(kind, tmp_path):
    """NaN weights give NaN losses: each step is skipped, max_bad_steps in a row fail the run
    with exit code 1 and a 'failed' status, and nothing is saved from the bad state."""
    result = run_objective(kind, tmp_path, make_parent(tmp_path, poison=True), max_bad_steps=3)
    assert result.exit_code == 1 and result.step == 3
    assert result.status.startswith("failed at step 3: diverged: 3 non-finite steps in a row")
    meta = runs.read_configs(result.run_dir)[2]
    assert meta["status"] == result.status and meta["skipped_steps"] == 3
    assert not runs.list_checkpoints(result.run_dir)
    assert not (result.run_dir / runs.WEIGHTS).exists()


@pytest.mark.parametrize("cls,field", [(TrainConfig, "lr"), (TrainConfig, "max_minutes"),
                                       (TrainConfig, "grad_clip"), (SFTConfig, "lr"),
                                       (DPOConfig, "beta"), (ModelConfig, "norm_eps")])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_settings_are_rejected(cls, field, value):
    with pytest.raises(ConfigError, match=f"{field}={value!r} is invalid: must be a finite number"):
        cls(**{field: value})


def test_failed_overwrite_keeps_the_earlier_run(tmp_path):
    """overwrite=true replaces the old folder only after the new run's first checkpoint."""
    parent = make_parent(tmp_path)
    good = train(model_cfg(), train_cfg(tmp_path, init_from=str(parent)))
    before = {p.name: p.read_bytes() for p in good.run_dir.iterdir() if p.is_file()}
    bad = train(model_cfg(), train_cfg(tmp_path, init_from=str(make_parent(tmp_path, True)),
                                       overwrite=True, max_bad_steps=2))
    assert bad.exit_code == 1 and bad.run_dir == good.run_dir
    after = {p.name: p.read_bytes() for p in good.run_dir.iterdir() if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs", "tiny"]  # no lock file left
    again = train(model_cfg(), train_cfg(tmp_path, overwrite=True, max_iters=4))
    assert again.exit_code == 0 and runs.read_log(again.run_dir)["step"].iloc[-1] == 4


def test_a_run_folder_has_one_writer_and_stale_locks_are_taken_over(tmp_path, capsys):
    holder = RunFolder(tmp_path, "tiny", resume=False, overwrite=False)
    try:
        with pytest.raises(runs.RunError, match=rf"run 'tiny' in .* is in use by another "
                                                 rf"training \(process {os.getpid()}\)"):
            train(model_cfg(), train_cfg(tmp_path))
    finally:
        holder.release()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / ".tiny.lock").write_text(str(dead.pid))  # as a killed run leaves it
    RunFolder(tmp_path, "tiny", resume=False, overwrite=False).release()
    assert f"stale lock on 'tiny' left by process {dead.pid}" in capsys.readouterr().out


def _launch(tmp_path, *extra):
    cmd = [sys.executable, "-m", "minlm", "train", "--preset", "llama-1m", "vocab_size=512",
           "dim=16", "n_layers=1", "n_heads=2", "n_kv_heads=0", "block_size=64", "batch_size=4",
           "max_docs=300", "num_workers=1", "eval_iters=2", "log_interval=1", "warmup_iters=2",
           f"out_dir={tmp_path}", "run_name=same", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_two_trainings_into_one_folder_and_ctrl_c(tmp_path):
    """Two processes started together with one run_name: one trains, the other stops at once
    with a clear message. Ctrl-C then ends the trainer with 130, its state saved."""
    a, b = (_launch(tmp_path, "max_iters=100000", "verbose=false"),
            _launch(tmp_path, "max_iters=100000", "verbose=false"))
    log = tmp_path / "same" / "log.csv"
    deadline = time.time() + 120
    while time.time() < deadline and (a.poll() is None and b.poll() is None):
        time.sleep(0.05)
    loser, winner = (a, b) if a.poll() is not None else (b, a)
    out = loser.communicate(timeout=60)[0]
    assert loser.returncode == 2 and "is in use by another training (process" in out, out
    while time.time() < deadline and len(log.read_text().splitlines()) < 4:
        time.sleep(0.05)
    winner.send_signal(signal.SIGINT)
    out = winner.communicate(timeout=120)[0]
    assert winner.returncode == 130, out
    assert "interrupted (Ctrl-C)" in out and "saved, continue with resume=true" in out
    meta = runs.read_configs(tmp_path / "same")[2]
    assert meta["status"].startswith("stopped at step") and runs.list_checkpoints(tmp_path / "same")


def test_init_from_starts_from_the_parent_weights_and_names_it(tmp_path):
    parent = make_parent(tmp_path)
    stop = StopFlag()
    stop.set("before the first step")
    result = train(model_cfg(), train_cfg(tmp_path, init_from=str(parent)), stop=stop)
    child = runs.load_run(result.run_dir)
    assert result.step == 0 and child.meta["parent"] == "base"
    x = torch.randint(0, 512, (2, 16))
    with torch.no_grad():
        assert torch.equal(child.model(x)[0], runs.load_run(parent).model(x)[0])
    with pytest.raises(ConfigError, match="init_from=.*model config differs.*dim: parent 16, given 32"):
        train(model_cfg(dim=32), train_cfg(tmp_path, run_name="other", init_from=str(parent)))


def test_epochs_set_the_steps_and_keep_best_keeps_the_best_weights(tmp_path):
    cfg = train_cfg(tmp_path, epochs=0.02, max_iters=1, eval_interval=2, checkpoint_interval=2,
                    keep_checkpoints=100, keep_best=True, lr=3e-2)
    result = train(model_cfg(), cfg)
    from minlm.prepare import prepare

    shards = prepare(cfg.data, load_tokenizer("tinystories-512"), max_docs=300, num_workers=1,
                     verbose=False)
    assert result.step == math.ceil(0.02 * len(shards.train) / (4 * 64))
    log = runs.read_log(result.run_dir).dropna(subset=["val_loss"])
    best_step = int(log.loc[log["val_loss"].idxmin(), "step"])
    ckpt = dict(runs.list_checkpoints(result.run_dir))[best_step]
    expected = torch.load(ckpt, weights_only=True)["model"]
    from safetensors.torch import load_file

    best = load_file(result.run_dir / runs.BEST_WEIGHTS)
    assert all(torch.equal(best[k], expected[k]) for k in best)
