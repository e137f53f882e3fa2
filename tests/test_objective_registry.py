"""The objective registry: ``objective=<name>`` is checked against it, and recorded."""

import json

import pytest

from minlm.config import ConfigError, ModelConfig, TrainConfig
from minlm.objectives import Pretraining, objective_spec, register_objective
from minlm.train import train


def _cfgs(tmp_path, **train_overrides):
    model_cfg = ModelConfig.from_preset("llama-1m", dim=32, n_layers=1, n_heads=2, n_kv_heads=0,
                                        block_size=32, vocab_size=512)
    cfg = TrainConfig(preset="llama-1m", run_name="obj", out_dir=str(tmp_path), max_iters=4,
                      batch_size=4, warmup_iters=1, eval_interval=2, eval_iters=1,
                      log_interval=2, max_docs=200, overwrite=True, verbose=False,
                      **train_overrides)
    return model_cfg, cfg


def test_unknown_objective_is_one_line_listing_the_registered(tmp_path):
    with pytest.raises(ConfigError, match=r"objective='nope' is not a registered objective; "
                                          r"registered: .*pretrain"):
        objective_spec("nope")
    model_cfg, cfg = _cfgs(tmp_path, objective="nope")
    with pytest.raises(ConfigError, match="objective='nope'"):
        train(model_cfg, cfg)
    assert not (tmp_path / "obj").exists()  # refused before the folder is made


class _Counting(Pretraining):
    """Pretraining that counts its batches, to show the registered class is the one built."""

    built = 0

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        type(self).built += 1


def test_registered_objective_is_built_recorded_and_resumed(tmp_path):
    register_objective("counting_test", cls=_Counting, bpb_is_bound=True)
    model_cfg, cfg = _cfgs(tmp_path, objective="counting_test")
    result = train(model_cfg, cfg)
    assert _Counting.built == 1 and result.step == 4
    record = json.loads((result.run_dir / "train_config.json").read_text())
    assert record["objective"] == "counting_test"
    assert "counting_test" in (result.run_dir / "train_config.json").read_text()
    assert '"bpb_is_bound": true' in (result.run_dir / "train_config.json").read_text()
    from minlm.runs import list_runs

    assert bool(list_runs(tmp_path).set_index("run").loc["obj", "val_bpb_is_bound"])
    more = train(model_cfg, cfg.replace(max_iters=6, resume=True, overwrite=False))
    assert _Counting.built == 2 and more.step == 6
