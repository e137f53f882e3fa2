"""Ship a finished run as a zoo model in ``trained_models/<name>``.

The zoo folder is the run folder without its checkpoints: weights, configs, log and tokenizer,
with ``run_name`` set to the zoo name and the command that trained it kept in its meta. The
card (README.md) is then written from that folder, with bits per byte measured over every
token of the validation file, so no figure is copied by hand. The old folder is replaced only
once the new one is complete.

    MINLM_DATA_DIR=../shared/data python bench/ship.py RUN_DIR llama-1m \
        --command "python bench/speedrun.py --recipe speedrun --tokens 14M"
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from minlm.data import validation_file
from minlm.errors import report_errors
from minlm.fileio import atomic_write_text
from minlm.modelcard import write_model_card
from minlm.runs import read_configs

ZOO = Path(__file__).resolve().parents[1] / "trained_models"
KEEP = ("model.safetensors", "model.ternary.safetensors", "model_config.json",
        "train_config.json", "log.csv", "tokenizer.model")


def ship(run_dir: Path, name: str, command: str = "", zoo: Path = ZOO,
         valid: Path | None = None) -> Path:
    """Copy ``run_dir`` into ``zoo/name`` (replacing what is there) and write its card."""
    _, train_cfg, meta = read_configs(run_dir)
    if meta.get("status", "").split(":")[0] != "finished":
        raise SystemExit(f"error: {run_dir} did not finish (status: {meta.get('status', '?')!r})")
    valid = valid or validation_file(train_cfg.data)
    staging = zoo / ".staging" / name  # the card reads the folder's name, so stage it by name
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    for file in KEEP:
        if (run_dir / file).exists():
            shutil.copy2(run_dir / file, staging / file)
    config = json.loads((staging / "train_config.json").read_text())
    config["run_name"] = name
    if command:
        config["meta"]["command"] = command
    atomic_write_text(staging / "train_config.json", json.dumps(config, indent=2) + "\n")
    write_model_card(staging, valid)
    target = zoo / name
    if target.exists():
        shutil.rmtree(target)
    staging.rename(target)
    if not any(staging.parent.iterdir()):
        staging.parent.rmdir()
    return target


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_dir", type=Path, help="a finished run folder")
    p.add_argument("name", help="the zoo name (trained_models/NAME)")
    p.add_argument("--command", default="", help="the command that trained it, for the card")
    p.add_argument("--valid", type=Path, default=None,
                   help="file the card's bits per byte are measured on (default: the data's "
                        "validation file)")
    p.add_argument("--zoo", type=Path, default=ZOO)
    p.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    args = p.parse_args(argv)
    print(ship(args.run_dir, args.name, args.command, args.zoo, args.valid))


if __name__ == "__main__":
    sys.exit(report_errors(main, "--debug" in sys.argv))
