"""The speedrun harness (bench/speedrun.py) and the engine's target: ``target_bpb`` records the
first evaluation at or below it, ``stop_at_bpb`` ends the run there.

A tiny model's first evaluation is near 4.4 bits per byte: a target of 5 is reached at the
first evaluation, one of 0.01 never."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from minlm import ModelConfig, TrainConfig
from minlm.config import ConfigError
from minlm.runs import read_configs
from minlm.train import train

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("shard_cache", "one_thread")
TINY = ["--preset", "llama-0.5m", "vocab_size=512", "dim=32", "n_layers=1", "n_heads=2",
        "n_kv_heads=1", "block_size=32", "batch_size=4", "max_docs=200", "num_workers=1"]
# 128 tokens a step; an evaluation every 4 steps over 8 fixed windows
FAST = ["--eval-every", "4", "--eval-windows", "8", "--valid-docs", "30", "--quiet"]


def speedrun(tmp_path, *args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, str(REPO / "bench" / "speedrun.py"), *TINY, *FAST,
                           "--out-dir", str(tmp_path / "runs"), "--results",
                           str(tmp_path / "speedrun.csv"), *args],
                          capture_output=True, text=True, env=env, timeout=120)


def rows(tmp_path) -> list[dict]:
    with open(tmp_path / "speedrun.csv", newline="") as f:
        return list(csv.DictReader(f))


def bench_module():
    spec = importlib.util.spec_from_file_location("speedrun", REPO / "bench" / "speedrun.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_generous_target_stops_there_and_reports_tokens_and_time_to_it(tmp_path, shared_data):
    out = speedrun(tmp_path, "--target", "5", "--tokens", "4K", "--stop-at-target")
    assert out.returncode == 0, out.stderr
    assert "target 5.0 val bpb reached at step 4: 512 tokens" in out.stdout
    [row] = rows(tmp_path)
    assert row["reached"] == "True" and row["steps"] == row["steps_to_target"] == "4"
    assert row["tokens_to_target"] == "512" and float(row["minutes_to_target"]) >= 0
    assert float(row["flops_to_target"]) > 0 and float(row["final_valid_bpb"]) > 0
    assert row["stopped"] == "reached the target of 5.0 val bits/byte"
    assert row["hardware"] and row["threads"] == "1"
    assert row["command"].startswith("python bench/speedrun.py --name llama-0.5m")
    assert "| llama-0.5m | 28,768 | 512 | 0.000512M |" in out.stdout  # the record-table row
    _, cfg, meta = read_configs(Path(row["run_dir"]))  # an ordinary run folder
    assert cfg.stop_at_bpb == 5 and meta["target_reached"]["step"] == 4


def test_an_unreachable_target_runs_to_the_token_budget_and_says_not_reached(tmp_path,
                                                                             shared_data):
    out = speedrun(tmp_path, "--target", "0.01", "--tokens", "1024")
    assert out.returncode == 0, out.stderr
    assert "target 0.01 val bpb not reached in 1,024 tokens" in out.stdout
    [row] = rows(tmp_path)
    assert row["reached"] == "False" and row["tokens_to_target"] == ""
    assert row["steps"] == "8" and row["tokens"] == "1024" and row["stopped"] == "token budget"
    assert row["final_slice_bpb"] and row["final_valid_bpb"]
    assert "| not reached | not reached | not reached |" in out.stdout


def test_ablation_reverts_one_override_per_entry_and_appends_a_row_each(tmp_path, shared_data):
    code = bench_module().main([*TINY, *FAST, "lr=0.01", "--name", "mine", "--target", "5",
                                "--tokens", "512", "--ablate", "lr", "--out-dir",
                                str(tmp_path / "runs"), "--results", str(tmp_path / "speedrun.csv")])
    assert code == 0
    full, ablated = rows(tmp_path)
    assert (full["recipe"], ablated["recipe"]) == ("mine", "mine-no-lr")
    assert "lr=0.01" in full["command"] and "lr=" not in ablated["command"]
    _, cfg, _ = read_configs(Path(ablated["run_dir"]))
    assert cfg.lr == TrainConfig().lr


def test_settings_the_harness_owns_and_unknown_ablations_are_refused(tmp_path):
    module = bench_module()
    base = [*TINY, "--out-dir", str(tmp_path), "--results", str(tmp_path / "r.csv")]
    with pytest.raises(SystemExit, match="max_iters is set by the speedrun; use --tokens"):
        module.main([*base, "max_iters=5"])
    with pytest.raises(SystemExit, match="--ablate 'schedule' is not an override of llama-0.5m; "
                       "its overrides: vocab_size"):
        module.main([*base, "--ablate", "schedule"])
    assert not (tmp_path / "r.csv").exists()


def test_named_recipes_are_read_from_the_json_file(tmp_path):
    module = bench_module()
    preset, items = module.read_recipe("shipped")
    assert preset == "llama-1m" and "optimizer=muon" in items and "lr=0.004" in items
    path = tmp_path / "recipes.json"
    path.write_text(json.dumps({"a": {"preset": "gpt2-1m", "overrides": ["lr=0.01"]}}))
    assert module.read_recipe("a", path) == ("gpt2-1m", ["lr=0.01"])
    with pytest.raises(SystemExit, match="--recipe 'b' is not in .*; recipes there: a"):
        module.read_recipe("b", path)


def test_target_bpb_records_the_first_crossing_and_the_run_goes_on(tmp_path, shared_data):
    model = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=1,
                                    n_heads=2, n_kv_heads=1, block_size=32)
    cfg = TrainConfig(run_name="t", out_dir=str(tmp_path), max_iters=12, batch_size=4,
                      eval_interval=4, eval_iters=2, max_docs=200, num_workers=1,
                      verbose=False, target_bpb=5.0)
    result = train(model, cfg)
    assert result.step == 12 and result.stopped == ""
    assert result.target_reached["step"] == 4 and result.target_reached["tokens"] == 512
    meta = read_configs(result.run_dir)[2]
    assert meta["target_bpb"] == 5.0 and meta["target_reached"] == result.target_reached


def test_stop_at_bpb_ends_python_m_minlm_train_as_a_normal_finish(tmp_path, shared_data):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-m", "minlm", "train", *TINY,
                          "max_iters=40", "eval_interval=4", "eval_iters=2", "stop_at_bpb=5",
                          "verbose=false", "run_name=s", f"out_dir={tmp_path}"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    meta = read_configs(tmp_path / "s")[2]
    assert meta["steps"] == 4 and meta["target_reached"]["step"] == 4
    assert meta["status"] == "finished: reached the target of 5.0 val bits/byte"  # planned


@pytest.mark.parametrize("field", ["target_bpb", "stop_at_bpb"])
def test_a_negative_target_is_refused_naming_the_field(field):
    with pytest.raises(ConfigError, match=f"{field}=-1.0 is invalid: must be >= 0"):
        TrainConfig(**{field: -1.0})


def test_the_token_budget_counts_a_batch_warm_up_smaller_first_batches():
    """With a batch warm-up the first steps read fewer tokens: the budget still holds in full."""
    from minlm.objectives import pretraining_step_tokens

    module = bench_module()
    args = module.parse_args(["--tokens", "3M"])
    model_cfg, cfg = module.configs("llama-1m", ["batch_warmup_iters=50"], args, "w")
    first = pretraining_step_tokens(cfg, model_cfg.block_size)
    full = cfg.batch_size * model_cfg.block_size
    read = sum(first) + (cfg.max_iters - len(first)) * full
    assert 3_000_000 <= read < 3_000_000 + full


def test_ship_copies_a_finished_run_into_the_zoo_with_a_measured_card(tmp_path, shared_data):
    """bench/ship.py, run as a person runs it: the zoo folder is the run without checkpoints,
    named as asked, loadable, with a card that names the command and measures bits per byte;
    shipping again replaces it."""
    from minlm.runs import absolute_paths, load_run

    out = speedrun(tmp_path, "--target", "5", "--tokens", "1K")
    assert out.returncode == 0, out.stderr
    [row] = rows(tmp_path)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    zoo = tmp_path / "zoo"
    for _ in range(2):
        ship = subprocess.run([sys.executable, str(REPO / "bench" / "ship.py"), row["run_dir"],
                               "tiny-zoo", "--zoo", str(zoo), "--command", "python train.py x=1"],
                              capture_output=True, text=True, env=env, timeout=120)
        assert ship.returncode == 0, ship.stderr
    assert sorted(p.name for p in zoo.iterdir()) == ["tiny-zoo"]
    shipped = zoo / "tiny-zoo"
    assert not list(shipped.glob("checkpoint-*")) and (shipped / "model.safetensors").exists()
    card = (shipped / "README.md").read_text()
    assert card.startswith("# tiny-zoo\n") and "| trained with | `python train.py x=1` |" in card
    assert "bits per byte on `valid.txt` (every token)" in card
    _, train_cfg, meta = read_configs(shipped)
    assert train_cfg.run_name == "tiny-zoo" and meta["command"] == "python train.py x=1"
    assert not absolute_paths(json.loads((shipped / "train_config.json").read_text()))
    assert load_run(shipped).model.num_params() == meta["params"]


def test_ship_refuses_a_run_that_did_not_finish(tmp_path, shared_data):
    out = speedrun(tmp_path, "--target", "5", "--tokens", "1K")
    run_dir = Path(rows(tmp_path)[0]["run_dir"])
    config = json.loads((run_dir / "train_config.json").read_text())
    config["meta"]["status"] = "failed: loss is NaN"
    (run_dir / "train_config.json").write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    ship = subprocess.run([sys.executable, str(REPO / "bench" / "ship.py"), str(run_dir), "x",
                           "--zoo", str(tmp_path / "zoo")], capture_output=True, text=True,
                          env=env, timeout=120)
    assert ship.returncode != 0 and "did not finish" in ship.stderr
    assert not (tmp_path / "zoo" / "x").exists()
