"""ipywidgets front ends for the notebooks: live training with a Stop button, sampling controls.

Training runs in a background thread so the notebook stays responsive and the Stop button can
be pressed; ``TrainingWidget.wait()`` joins it (a notebook cell calls it when it needs the
result, and tests call ``stop_button.click()`` from Python).
"""

from __future__ import annotations

import html
import threading

import ipywidgets as W

from minlm.config import ModelConfig, TrainConfig
from minlm.train import StopFlag, TrainResult, train


class TrainingWidget:
    """A live loss plot (bits per byte), tokens/s, a progress bar and a Stop button."""

    def __init__(self, model_cfg: ModelConfig, train_cfg: TrainConfig, plot_every: int = 1):
        self.model_cfg, self.train_cfg = model_cfg, train_cfg
        self.stop_flag = StopFlag()
        self.rows: list[dict] = []
        self.result: TrainResult | None = None
        self.error: BaseException | None = None
        self.plot_every = plot_every
        self._thread: threading.Thread | None = None
        self.progress = W.IntProgress(value=0, min=0, max=train_cfg.max_iters, description="step")
        self.status = W.HTML("ready")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop",
                                    tooltip="finish the current step, save the run and stop")
        self.stop_button.on_click(lambda _: self.stop_flag.set("Stop button pressed"))
        self.plot = W.Output()
        self.box = W.VBox([W.HBox([self.progress, self.stop_button]), self.status, self.plot])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    # --- training thread -------------------------------------------------------------------
    def start(self) -> "TrainingWidget":
        if self._thread and self._thread.is_alive():
            raise RuntimeError("training is already running")
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.status.value = "preparing data..."
            self.result = train(self.model_cfg, self.train_cfg, stop=self.stop_flag,
                                callbacks=[self._on_row])
            self.progress.value = self.result.step
            self.status.value = f"<b>done</b>: {self.result}"
        except BaseException as e:  # noqa: BLE001 - shown in the widget and re-raised by wait()
            self.error = e
            self.status.value = f"<b style='color:#b00'>error</b>: {e}"
        finally:
            self.stop_button.disabled = True

    def wait(self, timeout: float | None = None) -> TrainResult:
        """Block until training ends; re-raise its error if it failed."""
        if self._thread is not None:
            self._thread.join(timeout)
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RuntimeError("training has not finished")
        return self.result

    def _on_row(self, row: dict) -> None:
        self.rows.append(row)
        self.progress.value = row["step"]
        val = f", val bits/byte {row['val_bpb']:.3f}" if row.get("val_bpb") is not None else ""
        self.status.value = (f"step {row['step']}: train loss {row['train_loss']:.3f}{val}, "
                             f"{row['tokens_per_s']:,.0f} tokens/s")
        if len(self.rows) % self.plot_every == 0 or row.get("val_bpb") is not None:
            self.redraw()

    def figure(self):
        """The loss curves so far (train and val, in bits per byte) as a matplotlib figure."""
        from matplotlib.figure import Figure

        fig = Figure(figsize=(7, 3.2))
        ax = fig.add_subplot()
        steps = [r["step"] for r in self.rows if r.get("train_bpb") is not None]
        ax.plot(steps, [r["train_bpb"] for r in self.rows if r.get("train_bpb") is not None],
                label="train", alpha=0.7)
        evals = [r for r in self.rows if r.get("val_bpb") is not None]
        ax.plot([r["step"] for r in evals], [r["val_bpb"] for r in evals], "o-", label="val")
        ax.set_xlabel("step")
        ax.set_ylabel("bits per byte")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        return fig

    def redraw(self) -> None:
        fig = self.figure()
        with self.plot:
            from IPython.display import clear_output, display

            clear_output(wait=True)
            display(fig)


def training_widget(model_cfg: ModelConfig, train_cfg: TrainConfig, start: bool = True) -> TrainingWidget:
    w = TrainingWidget(model_cfg, train_cfg)
    return w.start() if start else w


class SamplingWidget:
    """Prompt box, sampling sliders and a Generate button; output shows coloured tokens."""

    def __init__(self, run, prompt: str = "Once upon a time"):
        self.run = run
        self.prompt = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="90%"))
        self.temperature = W.FloatSlider(value=0.8, min=0.0, max=2.0, step=0.05, description="temperature")
        self.top_k = W.IntSlider(value=0, min=0, max=200, description="top-k")
        self.top_p = W.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p")
        self.min_p = W.FloatSlider(value=0.05, min=0.0, max=0.5, step=0.01, description="min-p")
        self.max_tokens = W.IntSlider(value=100, min=1, max=run.model_config.block_size, description="max tokens")
        self.seed = W.IntText(value=0, description="seed")
        self.button = W.Button(description="Generate", button_style="primary")
        self.output = W.Output()
        self.button.on_click(lambda _: self.generate())
        self.box = W.VBox([self.prompt, W.HBox([self.temperature, self.top_k]),
                           W.HBox([self.top_p, self.min_p]), W.HBox([self.max_tokens, self.seed]),
                           self.button, self.output])
        self.last_text = ""

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    def generate(self) -> str:
        from IPython.display import display

        from minlm.generate import generate

        text = generate(self.run.model, self.run.tokenizer, self.prompt.value,
                        self.max_tokens.value, temperature=self.temperature.value,
                        top_k=self.top_k.value, top_p=self.top_p.value, min_p=self.min_p.value,
                        seed=self.seed.value)
        self.last_text = text
        with self.output:
            self.output.clear_output(wait=True)
            display(self.run.tokenizer.display(self.prompt.value + text))
        return text


def run_picker(runs_df, default: list[str] | None = None) -> W.SelectMultiple:
    """A multi-select over ``list_runs()``; its ``.value`` is the tuple of chosen run names."""
    names = list(runs_df["run"]) if len(runs_df) else []
    chosen = tuple(n for n in (default or names) if n in names)
    return W.SelectMultiple(options=names, value=chosen, rows=min(10, max(3, len(names))),
                            description="runs")



class ChatWidget:
    """A chat box over ``generate.Chat``: type a message, press Enter or Send; the transcript
    shows each reply as it streams. ``send(text)`` does the same from Python (and returns the
    reply); ``reset()`` clears the history."""

    def __init__(self, run, system: str = "", max_new_tokens: int = 100, **sampling):
        from minlm.generate import Chat

        self.run = run
        self.chat = Chat(run.model, run.tokenizer, system=system, max_new_tokens=max_new_tokens,
                         **sampling)
        self.text = W.Text(placeholder="message, then Enter", layout=W.Layout(width="70%"))
        self.button = W.Button(description="Send", button_style="primary")
        self.clear = W.Button(description="Reset", tooltip="forget the conversation")
        self.output = W.Output(layout=W.Layout(border="1px solid #ddd", padding="4px"))
        self.button.on_click(lambda _: self._send_box())
        self.clear.on_click(lambda _: self.reset())
        self.text.continuous_update = False
        self.text.observe(lambda change: self._send_box(), names="value")
        self.box = W.VBox([self.output, W.HBox([self.text, self.button, self.clear])])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    def _send_box(self) -> None:
        message = self.text.value.strip()
        if message:
            self.text.value = ""
            self.send(message)

    def send(self, message: str) -> str:
        from IPython.display import HTML, display

        handle = None
        with self.output:
            display(HTML(f"<b>you</b>: {html.escape(message)}"))
            handle = display(HTML("<b>assistant</b>: …"), display_id=True)
        pieces: list[str] = []
        try:
            for piece in self.chat.stream_reply(message):
                pieces.append(piece)
                if handle is not None:
                    handle.update(HTML(f"<b>assistant</b>: {html.escape(''.join(pieces))}"))
        except ValueError as e:  # e.g. a message too long for the context: say so, go on
            with self.output:
                display(HTML(f"<span style='color:#b00'>error: {html.escape(str(e))}</span>"))
            return ""
        reply = "".join(pieces)
        if handle is not None:
            handle.update(HTML(f"<b>assistant</b>: {html.escape(reply)}"))
        return reply

    def reset(self) -> None:
        self.chat.history.clear()
        self.output.clear_output()
