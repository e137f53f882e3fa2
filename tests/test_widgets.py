import threading

import pytest

from minlm import ModelConfig, TrainConfig
from minlm.runs import list_checkpoints, load_run, read_log
from minlm.widgets import TrainingWidget, run_picker


@pytest.fixture
def cfgs(tmp_path, monkeypatch):
    monkeypatch.setenv("MINLM_CACHE_DIR", str(tmp_path / "cache"))
    model_cfg = ModelConfig.from_preset("llama-0.5m", vocab_size=512, dim=32, n_layers=2,
                                        n_heads=2, n_kv_heads=1, block_size=32)
    train_cfg = TrainConfig(run_name="w", out_dir=str(tmp_path), max_iters=500, batch_size=4,
                            log_interval=2, eval_interval=4, eval_iters=1, checkpoint_interval=1000,
                            max_docs=200, verbose=False, num_workers=1)
    return model_cfg, train_cfg


def test_stop_button_saves_run_and_resume_works(cfgs):
    model_cfg, train_cfg = cfgs
    widget = TrainingWidget(model_cfg, train_cfg)
    first_rows = threading.Event()
    original = widget._on_row

    def on_row(row):
        original(row)
        if row["step"] >= 6:
            first_rows.set()

    widget._on_row = on_row
    widget.start()
    assert first_rows.wait(timeout=120), "training produced no log rows"
    widget.stop_button.click()  # pressed from Python, as a user would in the notebook
    result = widget.wait(timeout=120)
    assert result.stopped == "Stop button pressed"
    assert 6 <= result.step < train_cfg.max_iters
    run_dir = result.run_dir
    assert (run_dir / "model.safetensors").exists()
    assert list_checkpoints(run_dir)[0][0] == result.step
    assert widget.stop_button.disabled
    assert len(widget.figure().axes[0].lines) == 2  # train and val curves

    resumed = TrainingWidget(model_cfg, train_cfg.replace(resume=True, max_iters=result.step + 4))
    final = resumed.start().wait(timeout=120)
    assert final.step == result.step + 4 and not final.stopped
    assert read_log(run_dir)["step"].iloc[-1] == final.step
    load_run(run_dir)


def test_widget_reports_errors(cfgs):
    model_cfg, train_cfg = cfgs
    widget = TrainingWidget(model_cfg.replace(vocab_size=100), train_cfg)  # tokenizer is 512
    with pytest.raises(ValueError, match="vocab_size=100"):
        widget.start().wait(timeout=60)
    assert "error" in widget.status.value


def test_run_picker_defaults_to_all_runs():
    import pandas as pd

    picker = run_picker(pd.DataFrame({"run": ["a", "b"]}))
    assert picker.options == ("a", "b") and picker.value == ("a", "b")
    assert run_picker(pd.DataFrame({"run": ["a", "b"]}), default=["b"]).value == ("b",)
