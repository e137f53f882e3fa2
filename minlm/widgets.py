"""ipywidgets front ends for the notebooks: live training with a Stop button, sampling controls.

Training runs in a background thread so the notebook stays responsive. A kernel busy in a
blocking cell queues the widgets' messages, so a click on Stop during "Run All" would only
arrive after training; the notebook therefore waits with ``result = await widget``: while a
cell awaits, ipykernel (7.4+) still dispatches widget messages, and Stop works. Interrupt
(SIGINT) stops the run the way Ctrl-C does on the command line: the step finishes, checkpoint
and weights are saved, and then the awaiting cell raises ``KeyboardInterrupt`` (one line: saved,
resume with ...), so "Run All" and cells queued after it stop, as they do after any interrupted
cell. Stop is a normal end: the result comes back and the next cells use it. ``wait()`` is the
blocking form, for scripts and tests (there Interrupt works too, Stop only from Python).

Everything a widget shows after it is displayed is widget *state* (an ``HTML`` value, a
progress value), never a display handle inside an ``Output`` widget: JupyterLab's widget
manager drops such updates, so a streamed chat reply would never appear.
"""

from __future__ import annotations

import html
import threading
import time
from pathlib import Path

import ipywidgets as W

from minlm.config import ModelConfig, TrainConfig
from minlm.runs import read_log_rows
from minlm.train import StopFlag, TrainResult, train

INTERRUPTED = "interrupted (Interrupt)"
# descriptions in full ("temperature", not "temperat…")
_LABEL = {"style": {"description_width": "initial"}}


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
        # set when training ends; waited on instead of Thread.join, which a KeyboardInterrupt
        # can leave reporting a live thread as finished (Python 3.11)
        self._done = threading.Event()
        self._interrupted = False  # Interrupt / Ctrl-C was pressed: the wait raises after saving
        budget_s = int(60 * train_cfg.max_minutes) if train_cfg.max_minutes else 0
        # on a time budget the bar shows seconds elapsed of the budget, else steps of max_iters
        self.progress = W.IntProgress(value=0, min=0, max=budget_s or train_cfg.max_iters,
                                      description="seconds" if budget_s else "step")
        if train_cfg.resume:  # the plot goes on from where the run stopped
            run_dir = Path(train_cfg.out_dir) / train_cfg.run_name
            if (run_dir / "log.csv").exists():
                self.rows = read_log_rows(run_dir)
        self.status = W.HTML("ready")
        self.status.add_class("minlm-status")  # a handle for the browser test
        self.progress.add_class("minlm-progress")
        self.stop_button = W.Button(description="Stop", button_style="danger", icon="stop",
                                    tooltip="finish the current step, save the run and stop")
        self.stop_button.on_click(lambda _: self.stop_flag.set("Stop button pressed"))
        self.plot = W.Image(format="png")  # the loss curves, redrawn as the value changes
        self.box = W.VBox([W.HBox([self.progress, self.stop_button]), self.status, self.plot])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    # --- training thread -------------------------------------------------------------------
    def start(self) -> "TrainingWidget":
        if self._thread and self._thread.is_alive():
            raise RuntimeError("training is already running")
        self._done.clear()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self) -> None:
        try:
            self.status.value = "preparing data..."
            self.result = train(self.model_cfg, self.train_cfg, stop=self.stop_flag,
                                callbacks=[self._on_row])
            # the bar ends where the run did: full and green when it used its steps (or its
            # time budget), else at the step reached, blue (a Stop is no error, but not done)
            done = self.result.status.startswith("finished")
            if done:
                self.progress.value = self.progress.max
            self.progress.bar_style = "success" if done else "info"
            word = "done" if done else "stopped"  # the reason is in the result's line, once
            self.status.value = f"<b>{word}</b>: {html.escape(str(self.result))}"
        except BaseException as e:  # noqa: BLE001 - shown in the widget and re-raised by wait()
            self.error = e
            self.progress.bar_style = "danger"
            self.status.value = f"<b style='color:#b00'>error</b>: {html.escape(str(e))}"
        finally:
            self.stop_button.disabled = True
            self._done.set()

    def wait(self, timeout: float | None = None) -> TrainResult:
        """Block until training ends and return its result; re-raise its error if it failed.

        A ``KeyboardInterrupt`` (Ctrl-C, or Interrupt in a notebook) stops the run gracefully:
        the training thread finishes its step and saves checkpoint and weights, then
        ``KeyboardInterrupt`` is raised again with a line saying so (``self.result`` holds the
        result). In a notebook prefer ``await widget``, which keeps Stop working."""
        __tracebackhide__ = True
        deadline = None if timeout is None else time.monotonic() + timeout
        while self._thread is not None and not self._done.is_set():
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                break
            try:
                self._done.wait(left)
            except KeyboardInterrupt:
                self.interrupt()
        return self._outcome()

    async def wait_async(self, timeout: float | None = None) -> TrainResult:
        """``wait()`` for a notebook cell (``await widget``): widget events keep flowing while
        it waits, and SIGINT (the toolbar's Interrupt) stops the run as ``wait()`` does."""
        import asyncio
        import signal

        __tracebackhide__ = True
        previous = None
        if threading.current_thread() is threading.main_thread():
            previous = signal.signal(signal.SIGINT, lambda *_: self.interrupt())
        try:
            deadline = None if timeout is None else time.monotonic() + timeout
            while (self._thread is not None and not self._done.is_set()
                   and (deadline is None or time.monotonic() < deadline)):
                await asyncio.sleep(0.05)
        finally:
            if previous is not None:
                signal.signal(signal.SIGINT, previous)
        return self._outcome()

    def __await__(self):
        return self.wait_async().__await__()

    def interrupt(self) -> None:
        """Stop after the current step, saving the run (what Interrupt and Ctrl-C do)."""
        self._interrupted = True
        self.stop_flag.set(INTERRUPTED, "interrupt")
        if self._thread is not None and not self._done.is_set():
            self.status.value = "interrupted: finishing the step and saving the run..."

    def _outcome(self) -> TrainResult:
        __tracebackhide__ = True  # IPython shows the one line, not this module's frames
        if self.error is not None:
            raise self.error
        if self.result is None:
            raise RuntimeError("training has not finished")
        if self._interrupted:  # stop what was queued after this cell, as any interrupt does
            raise KeyboardInterrupt(self._saved_line())
        return self.result

    def _saved_line(self) -> str:
        r = self.result
        return (f"{r.run_dir.name} interrupted at step {r.step}; saved; resume with "
                "train_cfg.replace(resume=True) (the Resume cell) or: python -m minlm train "
                f"run_name={r.run_dir.name} out_dir={r.run_dir.parent} resume=true")

    def _on_row(self, row: dict) -> None:
        self.rows.append(row)
        budget = self.progress.description == "seconds"
        self.progress.value = min(self.progress.max, int(row["elapsed_s"]) if budget else row["step"])
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
        self.plot.value = figure_png(self.figure())


def training_widget(model_cfg: ModelConfig, train_cfg: TrainConfig, start: bool = True) -> TrainingWidget:
    w = TrainingWidget(model_cfg, train_cfg)
    return w.start() if start else w


class SamplingWidget:
    """Prompt box, sampling sliders and a Generate button; output shows coloured tokens."""

    def __init__(self, run, prompt: str = "Once upon a time"):
        self.run = run
        self.prompt = W.Textarea(value=prompt, description="prompt", layout=W.Layout(width="90%"))
        self.temperature = W.FloatSlider(value=0.8, min=0.0, max=2.0, step=0.05, description="temperature", **_LABEL)
        self.top_k = W.IntSlider(value=0, min=0, max=200, description="top-k", **_LABEL)
        self.top_p = W.FloatSlider(value=1.0, min=0.05, max=1.0, step=0.05, description="top-p", **_LABEL)
        self.min_p = W.FloatSlider(value=0.05, min=0.0, max=0.5, step=0.01, description="min-p", **_LABEL)
        self.max_tokens = W.IntSlider(value=100, min=1, max=run.model_config.block_size, description="max tokens",
                                       **_LABEL)
        self.seed = W.IntText(value=0, description="seed", **_LABEL)
        self.button = W.Button(description="Generate", button_style="primary")
        self.output = W.HTML()  # the coloured tokens, as widget state
        self.output.add_class("minlm-sample")
        self.button.on_click(lambda _: self.generate())
        self.box = W.VBox([self.prompt, W.HBox([self.temperature, self.top_k]),
                           W.HBox([self.top_p, self.min_p]), W.HBox([self.max_tokens, self.seed]),
                           self.button, self.output])
        self.last_text = ""

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    def generate(self) -> str:
        from minlm.generate import generate

        text = generate(self.run.model, self.run.tokenizer, self.prompt.value,
                        self.max_tokens.value, temperature=self.temperature.value,
                        top_k=self.top_k.value, top_p=self.top_p.value, min_p=self.min_p.value,
                        seed=self.seed.value)
        self.last_text = text
        self.output.value = self.run.tokenizer.display(self.prompt.value + text)._repr_html_()
        return text


def run_picker(runs_df, default: list[str] | None = None, first: int = 4) -> W.SelectMultiple:
    """A multi-select over ``list_runs()``; its ``.value`` is the tuple of chosen run names:
    ``default``, else the ``first`` rows (``list_runs`` puts the best first). Not every run:
    with a dozen the plot's colours repeat and the side-by-side text table is cut off."""
    names = list(runs_df["run"]) if len(runs_df) else []
    chosen = tuple(n for n in (default or names[:first]) if n in names)
    return W.SelectMultiple(options=names, value=chosen, rows=min(10, max(3, len(names))),
                            description="runs")



class ChatWidget:
    """A chat box over ``generate.Chat``: type a message, press Enter or Send; the transcript
    shows each reply as it streams. ``send(text)`` does the same from Python (and returns the
    reply); ``reset()`` clears the history.

    The transcript is one ``HTML`` widget whose value is rewritten as tokens arrive, so the
    reply appears in any front end that syncs widget state (JupyterLab 4, VS Code)."""

    def __init__(self, run, system: str = "", max_new_tokens: int = 100, **sampling):
        from minlm.generate import Chat

        self.run = run
        self.chat = Chat(run.model, run.tokenizer, system=system, max_new_tokens=max_new_tokens,
                         **sampling)
        self.turns: list[tuple[str, str]] = []  # (who, text) as shown; who is you/assistant/error
        self.transcript = W.HTML(layout=W.Layout(border="1px solid #ddd", padding="4px",
                                                 min_height="2em"))
        self.text = W.Text(placeholder="message, then Enter", layout=W.Layout(width="70%"))
        self.button = W.Button(description="Send", button_style="primary")
        self.clear = W.Button(description="Reset", tooltip="forget the conversation")
        self.button.on_click(lambda _: self._send_box())
        self.clear.on_click(lambda _: self.reset())
        self.text.continuous_update = False
        self.text.observe(lambda change: self._send_box(), names="value")
        self.box = W.VBox([self.transcript, W.HBox([self.text, self.button, self.clear])])

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    def _send_box(self) -> None:
        message = self.text.value.strip()
        if message:
            self.text.value = ""
            self.send(message)

    def _render(self) -> None:
        lines = []
        for who, text in self.turns:
            if who == "error":
                lines.append(f"<div style='color:#b00'>error: {html.escape(text)}</div>")
            else:
                body = html.escape(text).replace("\n", "<br>")
                lines.append(f"<div class='minlm-{who}'><b>{who}</b>: {body}</div>")
        self.transcript.value = "".join(lines)

    def send(self, message: str) -> str:
        self.turns += [("you", message), ("assistant", "…")]
        self._render()
        pieces: list[str] = []
        try:
            for piece in self.chat.stream_reply(message):
                pieces.append(piece)
                self.turns[-1] = ("assistant", "".join(pieces))
                self._render()
        except ValueError as e:  # e.g. a message too long for the context: say so, go on
            self.turns[-1] = ("error", str(e))
            self._render()
            return ""
        reply = "".join(pieces)
        self.turns[-1] = ("assistant", reply)
        self._render()
        return reply

    def reset(self) -> None:
        self.chat.history.clear()
        self.turns.clear()
        self._render()


def figure_png(fig, dpi: int = 80) -> bytes:
    """A matplotlib figure as PNG bytes (for an ``Image`` widget's value)."""
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    return buf.getvalue()


class AttentionExplorer:
    """Attention heatmaps of a trained run: pick the run, layer and head (or all heads) and
    edit the sentence; the figure (with token labels and a colour bar) redraws as an ``Image``
    widget's value. Runs load once and are kept."""

    def __init__(self, runs: list[str], text: str = "Lily saw a big red ball. She ran to it.",
                 runs_dir: str | None = None, trust_experiment: bool = False):
        from minlm.runs import load_run

        if not runs:
            raise ValueError("runs is empty: pass run names or folders, e.g. ['llama-1m']")
        self._load, self._runs_dir, self._cache = load_run, runs_dir, {}
        self._trust = trust_experiment  # as load_run's
        self.run = W.Dropdown(options=list(runs), value=runs[0], description="run", **_LABEL)
        self.layer = W.Dropdown(description="layer", **_LABEL)
        self.head = W.Dropdown(description="head", **_LABEL)
        self.text = W.Text(value=text, description="text", continuous_update=False,
                           layout=W.Layout(width="60%"), **_LABEL)
        self.image = W.Image(format="png")
        self.error = W.HTML()
        self._choices()
        for w in (self.layer, self.head, self.text):
            w.observe(lambda _: self.draw(), names="value")
        self.run.observe(lambda _: (self._choices(), self.draw()), names="value")
        self.box = W.VBox([W.HBox([self.run, self.layer, self.head]), self.text, self.error,
                           self.image])
        self.draw()

    def _ipython_display_(self):
        from IPython.display import display

        display(self.box)

    def model(self):
        name = self.run.value
        if name not in self._cache:
            self._cache[name] = self._load(name, runs_dir=self._runs_dir,
                                           trust_experiment=self._trust)
        return self._cache[name]

    def _choices(self) -> None:
        cfg = self.model().model_config
        self.layer.options = list(range(cfg.n_layers))
        self.head.options = [("all", -1)] + [(str(h), h) for h in range(cfg.n_heads)]
        self.layer.value, self.head.value = 0, -1

    def figure(self):
        from minlm.plots import attention_figure

        run = self.model()
        heads = None if self.head.value in (-1, None) else self.head.value
        return attention_figure(run.model, run.tokenizer, self.text.value,
                                layer=self.layer.value or 0, heads=heads,
                                max_heads=run.model_config.n_heads)

    def draw(self) -> None:
        try:
            self.image.value = figure_png(self.figure())
            self.error.value = ""
        except ValueError as e:  # e.g. an empty sentence: say so in the widget
            self.error.value = f"<span style='color:#b00'>{html.escape(str(e))}</span>"
