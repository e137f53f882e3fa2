"""TensorBoard, MLflow and Weights & Biases receive the rows of log.csv, and their own readers
load them back."""

from __future__ import annotations

import json
import math
import sys

import pytest

from minlm import ModelConfig, TrainConfig, runs
from minlm.config import ConfigError
from minlm.train import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def shard_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)  # the default is offline


def tiny_run(tmp_path, logger: str):
    model_cfg = ModelConfig.from_preset("llama-1m", vocab_size=512, dim=16, n_layers=1, n_heads=2,
                                        n_kv_heads=0, block_size=32, multiple_of=8)
    cfg = TrainConfig(run_name="logged", out_dir=str(tmp_path), max_iters=6, batch_size=4,
                      warmup_iters=1, eval_interval=3, eval_iters=1, log_interval=2,
                      max_docs=200, verbose=False, num_workers=1, logger=logger)
    result = train(model_cfg, cfg)
    return result, runs.read_log(result.run_dir)


def same_rows(column: str, got: list[tuple[int, float]], log) -> None:
    """The (step, value) pairs a logger holds are log.csv's for ``column`` (fp32 in TB)."""
    want = [(int(s), float(v)) for s, v in zip(log["step"], log[column]) if not math.isnan(v)]
    assert [s for s, _ in got] == [s for s, _ in want] and want, column
    assert [v for _, v in got] == pytest.approx([v for _, v in want], rel=1e-6), column


def test_tensorboard_logger_writes_the_log_rows(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result, log = tiny_run(tmp_path, "tensorboard")
    events = EventAccumulator(str(result.run_dir / "tensorboard"))
    events.Reload()
    for column in ("train_loss", "val_loss", "lr", "train_bpb"):
        same_rows(column, [(e.step, e.value) for e in events.Scalars(column)], log)


@pytest.mark.slow
def test_mlflow_logger_writes_the_log_rows(tmp_path):
    from mlflow.tracking import MlflowClient

    result, log = tiny_run(tmp_path, "mlflow")
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = client.search_runs([client.get_experiment_by_name("minlm").experiment_id])
    assert run.info.run_name == "logged" and run.data.tags["status"] == "finished"
    for column in ("train_loss", "val_loss", "lr"):
        history = client.get_metric_history(run.info.run_id, column)
        same_rows(column, [(m.step, m.value) for m in history], log)


def wandb_rows(path) -> tuple[dict, list[dict]]:
    """(run record, history rows) of an offline .wandb file, scanned by wandb's own DataStore."""
    from wandb.proto import wandb_internal_pb2
    from wandb.sdk.internal.datastore import DataStore

    store = DataStore()
    store.open_for_scan(str(path))
    run, history = None, []
    while (data := store.scan_data()) is not None:
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run = record.run
        elif kind == "history":
            history.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                            for i in record.history.item})
    return run, history


def test_wandb_logger_writes_the_log_rows_offline(tmp_path):
    result, log = tiny_run(tmp_path, "wandb")
    (offline,) = (result.run_dir / "wandb").glob("offline-run-*")  # offline by default
    (path,) = offline.glob("*.wandb")
    run, history = wandb_rows(path)
    assert run.display_name == "logged" and run.project == "minlm"
    for column in ("train_loss", "val_loss", "lr"):
        same_rows(column, [(r["_step"], r[column]) for r in history if column in r], log)


def test_missing_logger_package_names_the_install(tmp_path, monkeypatch):
    from minlm.loggers import make_loggers

    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb now raises ImportError
    with pytest.raises(ConfigError, match=r"^logger='wandb' needs the wandb package: "
                                          r"pip install wandb \(or minlm's wandb extra: "
                                          r"pip install \"minlm\[wandb\]\"\)$"):
        make_loggers("wandb", tmp_path, "x", {})


def test_unknown_logger_is_refused():
    with pytest.raises(ConfigError, match="logger='neptune' is invalid: neptune is not one of "
                                          "tensorboard, mlflow, wandb"):
        TrainConfig(logger="neptune")
