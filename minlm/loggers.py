"""Log rows to the tools people already use, besides ``log.csv`` (which stays the record).

``logger=tensorboard`` writes TensorBoard event files into ``<run>/tensorboard/``::

    tensorboard --logdir trained_models            # every run, side by side

``logger=mlflow`` logs to MLflow: to ``$MLFLOW_TRACKING_URI`` when set, else to a local
SQLite store ``<out_dir>/mlflow.db`` (works offline)::

    mlflow ui --backend-store-uri sqlite:///trained_models/mlflow.db

``logger=wandb`` logs to Weights & Biases, offline unless ``WANDB_MODE`` says otherwise: the
run files go to ``<run>/wandb/offline-run-*/`` (no account or network needed), and
``wandb sync <run>/wandb/offline-run-*`` uploads them later; ``WANDB_MODE=online`` (after
``wandb login``) logs live. ``WANDB_PROJECT`` names the project (default ``minlm``)::

    python -m minlm train --preset llama-1m logger=wandb

Each receives exactly the rows the engine writes to ``log.csv`` (numeric columns, keyed by
``step``). Several at once: ``logger=tensorboard,mlflow,wandb``. The libraries are optional
extras (``pip install tensorboard mlflow-skinny wandb``), imported only when asked for.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from minlm.config import ConfigError, logger_names

def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def _need(package: str, pip_name: str, name: str):
    import importlib

    from minlm.errors import EXTRAS

    try:
        return importlib.import_module(package)
    except ImportError:
        extra = EXTRAS[package][1]  # the extra that installs it (pyproject.toml)
        raise ConfigError(f"logger={name!r} needs the {pip_name} package: pip install "
                          f"{pip_name} (or minlm's {extra} extra: pip install \"minlm[{extra}]\")"
                          ) from None


class TensorBoardLogger:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        # lazy: tensorboard is an optional extra, and heavy to import
        _need("tensorboard", "tensorboard", "tensorboard")
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(Path(run_dir) / "tensorboard"))
        self.writer.add_text("config", "\n".join(f"    {k}: {v}" for k, v in config.items()))

    def log(self, row: dict) -> None:
        for k, v in _numbers(row).items():
            self.writer.add_scalar(k, v, global_step=int(row["step"]))

    def close(self, status: str) -> None:
        self.writer.add_text("status", status)
        self.writer.close()


class MLflowLogger:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        mlflow = _need("mlflow", "mlflow-skinny", "mlflow")  # lazy: an optional extra
        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri("sqlite:///" + str((Path(run_dir).parent / "mlflow.db").resolve()))
        mlflow.set_experiment("minlm")
        self.run = mlflow.start_run(run_name=run_name)
        mlflow.log_params({k: str(v)[:500] for k, v in config.items()})

    def log(self, row: dict) -> None:
        self.mlflow.log_metrics(_numbers(row), step=int(row["step"]))

    def close(self, status: str) -> None:
        self.mlflow.set_tag("status", status)
        self.mlflow.end_run("FAILED" if status.startswith("failed") else "FINISHED")


class WandbLogger:
    def __init__(self, run_dir: Path, run_name: str, config: dict):
        wandb = _need("wandb", "wandb", "wandb")  # lazy: an optional extra, slow to import
        mode = os.environ.get("WANDB_MODE") or "offline"  # offline: no account, no network
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT") or "minlm", name=run_name,
                              dir=str(run_dir), mode=mode, config=config, reinit="create_new")

    def log(self, row: dict) -> None:
        self.run.log(_numbers(row), step=int(row["step"]))

    def close(self, status: str) -> None:
        self.run.summary["status"] = status
        self.run.finish(exit_code=1 if status.startswith("failed") else 0)


def make_loggers(spec: str, run_dir: Path, run_name: str, config: dict) -> list:
    """The loggers ``spec`` names, writing beside ``run_dir`` (the folder being written)."""
    kinds = {"tensorboard": TensorBoardLogger, "mlflow": MLflowLogger, "wandb": WandbLogger}
    return [kinds[n](run_dir, run_name, config) for n in logger_names(spec)]
