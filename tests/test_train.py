import math

import pandas as pd
import pytest
import torch

from minlm import LM, ModelConfig, TrainConfig
from minlm.evaluate import bits_per_byte
from minlm.runs import RunError, list_runs, load_run, read_configs, read_log
from minlm.train import StopFlag, lr_at, make_optimizer, train

DETERMINISTIC_COLUMNS = ["step", "tokens", "lr", "train_loss", "val_loss", "val_bpb", "grad_norm"]


def tiny_model_cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=512, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, block_size=32)
    return ModelConfig.from_preset("llama-0.5m", **{**base, **kw})


def tiny_train_cfg(tmp_path, **kw) -> TrainConfig:
    base = dict(run_name="tiny", out_dir=str(tmp_path), max_iters=24, batch_size=4, lr=3e-3,
                warmup_iters=4, eval_interval=8, eval_iters=2, log_interval=4,
                checkpoint_interval=8, max_docs=300, verbose=False, num_workers=1)
    return TrainConfig(**{**base, **kw})


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = LM(tiny_model_cfg(vocab_size=128))
    opt = make_optimizer(model, TrainConfig(lr=1e-2, weight_decay=0.0), torch.device("cpu"))
    x = torch.randint(0, 128, (4, 32))
    y = torch.randint(0, 128, (4, 32))
    start = model(x, y)[1].item()
    for _ in range(200):
        loss = model(x, y)[1]
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert loss.item() < start / 2, (start, loss.item())


def test_lr_schedule_shape():
    cfg = TrainConfig(lr=1.0, warmup_iters=10, max_iters=110, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.55)  # halfway through the cosine
    assert lr_at(110, cfg) == pytest.approx(0.1)
    assert lr_at(60, cfg.replace(schedule="linear")) == pytest.approx(0.55)
    assert lr_at(100, cfg.replace(schedule="constant")) == 1.0


def test_bits_per_byte_from_known_numbers():
    # 1000 tokens at ln(2) nats each = 1000 bits over 4000 bytes
    assert bits_per_byte(math.log(2), 1000, 4000) == pytest.approx(0.25)
    assert bits_per_byte(2.0, 10, 10) == pytest.approx(2 / math.log(2))
    with pytest.raises(ValueError, match="n_bytes=0"):
        bits_per_byte(1.0, 1, 0)


def test_run_folder_round_trip_and_listing(tmp_path, shard_cache):
    result = train(tiny_model_cfg(), tiny_train_cfg(tmp_path, max_iters=8))
    run_dir = result.run_dir
    for name in ("model_config.json", "train_config.json", "model.safetensors", "log.csv",
                 "tokenizer.model"):
        assert (run_dir / name).exists(), name
    assert result.val_loss is not None and result.val_bpb > 0
    log = read_log(run_dir)
    assert list(log.columns[:9]) == ["step", "tokens", "elapsed_s", "lr", "train_loss",
                                     "val_loss", "val_bpb", "tokens_per_s", "grad_norm"]
    assert log["step"].tolist() == [4, 8] and log["tokens"].iloc[-1] == 8 * 4 * 32
    run = load_run(run_dir)
    idx = torch.randint(0, 512, (2, 16))
    trained = torch.load(sorted(run_dir.glob("checkpoint-*.pt"))[-1], weights_only=True)["model"]
    fresh = LM(run.model_config)
    fresh.load_state_dict(trained)
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(run.model(idx)[0], fresh(idx)[0])
    runs = list_runs(tmp_path)
    assert runs.loc[0, "run"] == "tiny" and runs.loc[0, "steps"] == 8
    assert runs.loc[0, "val_bpb"] == pytest.approx(result.val_bpb)


def test_existing_run_is_refused(tmp_path, shard_cache):
    train(tiny_model_cfg(), tiny_train_cfg(tmp_path, max_iters=4, eval_interval=4))
    with pytest.raises(RunError, match="run 'tiny' already exists .* resume=true .* overwrite=true"):
        train(tiny_model_cfg(), tiny_train_cfg(tmp_path, max_iters=4))
    again = train(tiny_model_cfg(), tiny_train_cfg(tmp_path, max_iters=4, overwrite=True))
    assert again.step == 4


@pytest.mark.numerics
def test_resume_is_exact(tmp_path, shard_cache):
    """2N steps straight == N steps, stop, resume, N more: same weights, same log rows."""
    straight = train(tiny_model_cfg(dropout=0.1),
                     tiny_train_cfg(tmp_path / "a", checkpoint_interval=100))
    stop = StopFlag()

    def stop_at_10(row):
        if row["step"] >= 10:
            stop.set("test stop")

    cfg = tiny_train_cfg(tmp_path / "b", log_interval=5, checkpoint_interval=100)
    first = train(tiny_model_cfg(dropout=0.1), cfg, stop=stop, callbacks=[stop_at_10])
    assert first.step == 10 and first.stopped == "test stop"
    resumed = train(tiny_model_cfg(dropout=0.1), cfg.replace(resume=True))
    assert resumed.step == 24
    a = load_run(straight.run_dir).model.state_dict()
    b = load_run(resumed.run_dir).model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    log_a = read_log(straight.run_dir)[DETERMINISTIC_COLUMNS]
    log_b = read_log(resumed.run_dir)[DETERMINISTIC_COLUMNS]
    common = log_a[log_a["step"].isin(log_b["step"])].reset_index(drop=True)
    log_b = log_b[log_b["step"].isin(common["step"])].reset_index(drop=True)
    assert len(common) >= 4
    pd.testing.assert_frame_equal(common, log_b)


def test_resume_refuses_changed_model(tmp_path, shard_cache):
    stop = StopFlag()
    stop.set("before start")
    cfg = tiny_train_cfg(tmp_path, max_iters=4)
    train(tiny_model_cfg(), cfg, stop=stop)
    with pytest.raises(RunError, match="cannot resume 'tiny'.*dim: saved 32, given 64"):
        train(tiny_model_cfg(dim=64), cfg.replace(resume=True))


def test_tokenizer_larger_than_model_vocab_is_refused(tmp_path, shard_cache):
    from minlm.config import ConfigError

    with pytest.raises(ConfigError, match="has 1024 tokens but vocab_size=512"):
        train(tiny_model_cfg(), tiny_train_cfg(tmp_path, tokenizer="tinystories-1024"))


def test_time_budget_ends_on_one_evaluated_row(tmp_path, shard_cache):
    """A run stopped by max_minutes logs its last step once, with a validation figure
    (it used to log that step twice, the second row with 0 tokens/s)."""
    result = train(tiny_model_cfg(), tiny_train_cfg(tmp_path, max_iters=100_000, max_minutes=0.03,
                                                    log_interval=1, eval_interval=100_000))
    log = read_log(result.run_dir)
    assert log["step"].is_unique
    assert log["step"].iloc[-1] == result.step
    assert log["val_bpb"].iloc[-1] == pytest.approx(result.val_bpb)
    assert result.stopped.startswith("time budget")
    assert read_configs(result.run_dir)[2]["status"] == "finished: time budget of 0.03 min reached"
