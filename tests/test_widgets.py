import asyncio
import html
import os
import signal
import threading

import pytest

from minlm import ModelConfig, TrainConfig
from minlm.runs import list_checkpoints, list_runs, load_run, read_log
from minlm.widgets import INTERRUPTED, TrainingWidget, run_picker


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
    assert bytes(widget.plot.value).startswith(b"\x89PNG")  # the live plot is widget state
    # the bar ends where the run stopped (not full and green for 6 of 500 steps), blue
    assert widget.progress.bar_style == "info" and widget.status.value.startswith("<b>stopped")
    assert (widget.progress.value, widget.progress.max) == (result.step, train_cfg.max_iters)
    assert widget.status.value.count("Stop button pressed") == 1  # the reason said once
    # the log and the runs table end where the run stopped, not at the last logging interval
    assert read_log(run_dir)["step"].iloc[-1] == result.step
    assert list_runs(train_cfg.out_dir)["steps"][0] == result.step

    resumed = TrainingWidget(model_cfg, train_cfg.replace(resume=True, max_iters=result.step + 4))
    assert [r["step"] for r in resumed.rows] == list(read_log(run_dir)["step"])  # plot goes on
    final = resumed.start().wait(timeout=120)
    assert final.step == result.step + 4 and not final.stopped
    assert resumed.progress.bar_style == "success"
    assert resumed.progress.value == resumed.progress.max  # a run that used its steps: full
    assert read_log(run_dir)["step"].iloc[-1] == final.step
    load_run(run_dir)


def test_widget_reports_errors(cfgs):
    model_cfg, train_cfg = cfgs
    widget = TrainingWidget(model_cfg.replace(vocab_size=100), train_cfg)  # tokenizer is 512
    with pytest.raises(ValueError, match="vocab_size=100"):
        widget.start().wait(timeout=60)
    assert "error" in widget.status.value


def test_run_picker_defaults_to_the_best_few_runs():
    """Regression: every run was selected, so with a dozen the colours repeated and notebook
    4's side-by-side table was cut off; list_runs puts the best first."""
    import pandas as pd

    picker = run_picker(pd.DataFrame({"run": ["a", "b"]}))
    assert picker.options == ("a", "b") and picker.value == ("a", "b")
    assert run_picker(pd.DataFrame({"run": ["a", "b"]}), default=["b"]).value == ("b",)
    many = run_picker(pd.DataFrame({"run": [f"r{i}" for i in range(12)]}))
    assert len(many.options) == 12 and many.value == ("r0", "r1", "r2", "r3")


def _when_training(widget, min_step, action):
    """Run ``action`` from another thread once the widget has logged ``min_step``."""
    def watch():
        while not widget.rows or widget.rows[-1]["step"] < min_step:
            if widget.error is not None or widget.result is not None:
                return
            threading.Event().wait(0.05)
        action()
    threading.Thread(target=watch, daemon=True).start()


def _assert_saved(result, max_iters):
    assert result.stopped == INTERRUPTED and result.step < max_iters
    assert (result.run_dir / "model.safetensors").exists()
    assert list_checkpoints(result.run_dir)[0][0] == result.step


SAVED = r"interrupted at step \d+; saved; resume with"


def test_interrupt_during_wait_saves_the_run_then_raises(cfgs):
    """SIGINT (Ctrl-C, or Interrupt in a notebook) while wait() blocks: graceful stop, then
    KeyboardInterrupt with one line, so what comes after the wait does not run."""
    model_cfg, train_cfg = cfgs
    widget = TrainingWidget(model_cfg, train_cfg).start()
    _when_training(widget, 4, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt, match=SAVED) as raised:
        widget.wait(timeout=120)
    assert "\n" not in str(raised.value)
    _assert_saved(widget.result, train_cfg.max_iters)
    assert "interrupted" in widget.status.value
    assert widget.status.value.count(INTERRUPTED) == 1


def test_await_serves_stop_and_interrupt(cfgs):
    """``await widget`` (the notebook's form): a click on Stop while it waits is handled, and
    SIGINT goes to the widget's handler, not a KeyboardInterrupt through the event loop."""
    model_cfg, train_cfg = cfgs

    async def click_while_awaiting(widget):
        loop = asyncio.get_running_loop()
        _when_training(widget, 4, lambda: loop.call_soon_threadsafe(widget.stop_button.click))
        return await widget

    widget = TrainingWidget(model_cfg, train_cfg).start()
    assert asyncio.run(click_while_awaiting(widget)).stopped == "Stop button pressed"

    widget = TrainingWidget(model_cfg, train_cfg.replace(overwrite=True)).start()
    _when_training(widget, 4, lambda: os.kill(os.getpid(), signal.SIGINT))
    with pytest.raises(KeyboardInterrupt, match=SAVED):
        asyncio.run(widget.wait_async(timeout=120))
    _assert_saved(widget.result, train_cfg.max_iters)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_time_budget_progress_shows_seconds(cfgs):
    model_cfg, train_cfg = cfgs
    widget = TrainingWidget(model_cfg, train_cfg.replace(max_minutes=0.5))
    assert (widget.progress.description, widget.progress.max) == ("seconds", 30)


def test_normal_stop_leaves_the_tqdm_bar_green(cfgs, monkeypatch):
    """In a notebook tqdm draws a widget bar that turns red when closed short of its total;
    a Stop is a planned end and must not read as an error."""
    from tqdm.notebook import tqdm as notebook_tqdm

    import minlm.train

    bars = []

    class Recorded(notebook_tqdm):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            bars.append(self)

    monkeypatch.setattr(minlm.engine, "tqdm", Recorded)  # the one loop draws the bar
    model_cfg, train_cfg = cfgs
    widget = TrainingWidget(model_cfg, train_cfg.replace(verbose=True))
    widget.start()
    _when_training(widget, 4, widget.stop_button.click)
    result = widget.wait(timeout=120)
    bar = bars[-1]
    assert bar.container.children[1].bar_style == "success"
    # not "100% 7/7" for a run of 500 steps: the bar says where it stopped, of what
    text = "".join(w.value for w in bar.container.children if hasattr(w, "value")
                   and isinstance(w.value, str)).replace("\u2007", " ")
    assert f"stopped at {result.step} of {train_cfg.max_iters} steps" in text, text
    assert "100%" not in text


def test_list_runs_keeps_dpo_loss_apart(cfgs):
    from minlm.runs import read_configs, save_configs

    model_cfg, train_cfg = cfgs
    result = TrainingWidget(model_cfg, train_cfg.replace(max_iters=4)).start().wait(timeout=120)
    m, t, meta = read_configs(result.run_dir)
    save_configs(result.run_dir, m, t, {**meta, "kind": "dpo"})
    row = list_runs(train_cfg.out_dir).iloc[0]
    assert row["kind"] == "dpo" and row["val_loss"] is None or row["val_loss"] != row["val_loss"]
    assert row["val_dpo_loss"] == pytest.approx(read_log(result.run_dir)["val_loss"].dropna().iloc[-1])


@pytest.fixture
def tiny(tmp_path_factory):
    from minlm.train import tiny_run

    return load_run(tiny_run(tmp_path_factory.mktemp("tiny"), steps=2))


def test_sampling_widget_labels_in_full_and_output_is_widget_state(tiny):
    from minlm.widgets import SamplingWidget

    w = SamplingWidget(tiny, prompt="Once upon")
    for s in (w.temperature, w.top_k, w.top_p, w.min_p, w.max_tokens, w.seed):
        assert s.style.description_width == "initial", s.description  # "temperat…" otherwise
    w.max_tokens.value = 5
    text = w.generate()
    assert w.output.value == tiny.tokenizer.display("Once upon" + text)._repr_html_()
    w.temperature.value, w.seed.value = 1.5, 1
    w.button.click()  # as the Generate button does
    assert w.output.value == tiny.tokenizer.display("Once upon" + w.last_text)._repr_html_()


def test_chat_reply_streams_into_widget_state(tiny):
    """Each streamed piece rewrites the transcript's value (what JupyterLab and VS Code sync);
    a display handle inside an Output widget would be dropped by JupyterLab."""
    from minlm.widgets import ChatWidget

    chat = ChatWidget(tiny, max_new_tokens=6, temperature=0.8, seed=0)
    values = []
    chat.transcript.observe(lambda change: values.append(change["new"]), names="value")
    reply = chat.send("Hi")
    assert len(values) >= 3  # placeholder, then piece by piece
    assert "…" in values[0]
    assert values[-1].endswith(f"<b>assistant</b>: {html.escape(reply).replace(chr(10), '<br>')}</div>")
    assert chat.transcript.value.count("minlm-assistant") == 1
    chat.reset()
    assert chat.transcript.value == "" and chat.chat.history == []


def test_attention_of_the_trained_model_is_readable():
    """Notebook 5's heatmaps: the shipped trained llama-1m, layer and head chosen by widgets,
    token labels large enough to read and a colour bar."""
    from minlm.plots import attention_figure
    from minlm.widgets import AttentionExplorer

    explorer = AttentionExplorer(["llama-1m"], "Lily saw a ball. She ran to it.")
    run = explorer.model()
    assert explorer.layer.options == tuple(range(run.model_config.n_layers))
    first = bytes(explorer.image.value)
    assert first.startswith(b"\x89PNG")
    explorer.head.value = 1
    one_head = bytes(explorer.image.value)
    explorer.layer.value = run.model_config.n_layers - 1
    assert len({first, one_head, bytes(explorer.image.value)}) == 3
    fig = attention_figure(run.model, run.tokenizer, "Lily saw a ball.", layer=1, heads=[0, 2])
    heat, _, bar = fig.axes
    assert bar.get_ylabel() == "attention probability"
    labels = heat.get_xticklabels()
    pieces = [run.tokenizer.piece_text(i) for i in run.tokenizer.encode("Lily saw a ball.")]
    assert [t.get_text() for t in labels] == ["<s>"] + pieces
    assert min(t.get_fontsize() for t in labels) >= 9
    with pytest.raises(ValueError, match=r"heads=\[9\] are out of range: layer 1 has heads 0..3"):
        attention_figure(run.model, run.tokenizer, "Lily", layer=1, heads=9)
    with pytest.raises(ValueError, match="layer=7 is out of range"):
        attention_figure(run.model, run.tokenizer, "Lily", layer=7)


def test_text_table_keeps_line_breaks():
    import pandas as pd

    from minlm.plots import text_table

    df = pd.DataFrame({"llama-1m": ["Tom ran.\nHe fell."]}, index=["Once"])
    assert "\\n" in df._repr_html_()  # pandas' own table: a literal backslash-n
    page = text_table(df)._repr_html_()
    assert "Tom ran.\nHe fell." in page and "\\n" not in page and "pre-wrap" in page
