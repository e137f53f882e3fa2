"""The notebooks as a person meets them: JupyterLab 4 in headless Chromium, clicked with the mouse.

nbval runs cells without a front end, so it cannot see a click that never reaches a busy
kernel or a widget update the page drops. Here (MINLM_SMOKE=1, tiny models):
- ``2_train``: Run All, press the toolbar's Interrupt while ``await widget`` waits -> checkpoint +
  weights, one KeyboardInterrupt line, and no later cell runs; Run All again and click Stop ->
  the next cells use the result and the resume cell says how to go on instead of training.
- ``6_finetune_chat``: Run All, type a message + Enter -> the reply text appears.
- ``3_inference``: drag the temperature slider, click Generate -> new text.
Failure screenshots go to ``test-artifacts/browser/``. Needs the Debian ``chromium`` package
(``.ci/run`` installs it and sets ``MINLM_REQUIRE_BROWSER=1``, so there a missing browser fails).
"""

from __future__ import annotations

import functools
import os
import re
import time
from pathlib import Path

import pytest

from tests.conftest import data_dir
from tests.labdriver import CHROMIUM, REPO, JupyterLab, Lab, copy_notebooks

REQUIRED = os.environ.get("MINLM_REQUIRE_BROWSER") == "1"  # CI: a missing browser fails
if not Path(CHROMIUM).exists():
    if REQUIRED:
        raise RuntimeError(f"no Chromium at {CHROMIUM}: apt-get install chromium (or set MINLM_CHROMIUM)")
    pytest.skip(f"no Chromium at {CHROMIUM} (apt-get install chromium)", allow_module_level=True)
if REQUIRED:
    from playwright import sync_api
else:
    sync_api = pytest.importorskip("playwright.sync_api")

# 2_train's smoke run is a few seconds; the copy opened here trains long enough to be stopped.
LONG_TRAINING = {"2_train.ipynb": [("max_iters=30 if SMOKE", "max_iters=100000 if SMOKE")]}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = copy_notebooks(tmp_path_factory.mktemp("lab") / "notebooks", LONG_TRAINING)
    env = {"PYTHONPATH": str(REPO), "MINLM_SMOKE": "1", "MINLM_DATA_DIR": str(data_dir().resolve()),
           "MINLM_CACHE_DIR": str(root.parent / "cache"), "OMP_NUM_THREADS": "1"}
    lab = JupyterLab(root, env)
    yield lab
    lab.stop()


@pytest.fixture(scope="module")
def browser():
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


@pytest.fixture
def lab(server, browser):
    page = browser.new_page(viewport={"width": 1280, "height": 1000})
    page.set_default_timeout(60_000)
    yield Lab(page, server)
    page.close()


def screenshot_on_failure(test):
    """Save the page as test-artifacts/browser/<test>.png when the test fails."""
    @functools.wraps(test)
    def wrapper(lab):
        try:
            test(lab)
        except BaseException:
            print("screenshot:", lab.screenshot(test.__name__))
            raise
    return wrapper


def _run_dir(status: str) -> Path:
    """The run folder named in the widget's status line ("...: run /path/name: step 12, ...")."""
    m = re.search(r"run (/\S+): step (\d+)", status)
    assert m, f"no run folder in the widget's status: {status!r}"
    return Path(m.group(1))


def _text(locator) -> str:
    """The text of what ``locator`` matches, "" while nothing does (never waits)."""
    return "".join(locator.all_text_contents())


def _step(status: str) -> int:
    """The step in a live status line ("step 15: train loss ..."), else -1."""
    m = re.match(r"step (\d+):", status)
    return int(m.group(1)) if m else -1


def _assert_saved(run_dir: Path) -> None:
    assert (run_dir / "model.safetensors").exists(), f"no weights in {run_dir}"
    assert list(run_dir.glob("checkpoint*.pt")), f"no checkpoint in {run_dir}"


def _prompt(cell) -> str:
    """A cell's execution prompt as shown: "[3]:" ran, "[*]:" running or queued, "[ ]:" not run."""
    return "".join(cell.locator(".jp-InputArea-prompt").all_inner_texts()).strip()


def _run_all_until_training(lab):
    """2_train under Run All, waited on until ``await widget`` shows training rows; returns
    the widget cell and its status line."""
    lab.open("2_train.ipynb")
    lab.run_all()
    widget = lab.cell(3)
    status = widget.locator(".minlm-status, .widget-vbox > .widget-html").first
    lab.wait_for(lambda: lab.running(5) and _step(_text(status)) >= 10, 180,
                 "training rows while `await widget` runs")
    return widget, status


@screenshot_on_failure
def test_train_interrupt_during_run_all_saves_and_stops_the_queued_cells(lab):
    """The toolbar's Interrupt while ``await widget`` runs: the run saves, the waiting cell
    raises KeyboardInterrupt with one line, and Run All ends there, as for any cell."""
    widget, status = _run_all_until_training(lab)
    wait_cell = lab.cell(5)
    lab.interrupt()
    lab.wait_idle(120)
    stopped = _text(status)
    assert stopped.startswith("stopped") and stopped.count("interrupted (Interrupt)") == 1, stopped
    run_dir = _run_dir(stopped)
    _assert_saved(run_dir)
    end = time.monotonic() + 30  # the error output renders just after the kernel goes idle
    while not lab.errors() and time.monotonic() < end:
        time.sleep(0.3)
    errors = lab.errors()
    assert len(errors) == 1 and "KeyboardInterrupt" in errors[0], errors
    assert "saved; resume with" in errors[0], errors[0]
    assert "KeyboardInterrupt" in _text(wait_cell.locator(".jp-OutputArea-output"))
    for later in (6, 7, 9):  # queued by Run All: none of them ran
        assert _prompt(lab.cell(later)) == "[ ]:", (later, _prompt(lab.cell(later)))
    assert "info" in (widget.locator(".minlm-progress .progress-bar").get_attribute("class") or "")


@screenshot_on_failure
def test_train_stop_during_run_all_ends_normally_and_does_not_resume(lab):
    """Stop is a normal end: the next cells use the result; the resume cell does not start
    training again by itself, it says how to go on."""
    widget, status = _run_all_until_training(lab)
    resume_cell = lab.cell(9)
    widget.get_by_role("button", name="Stop").click()  # a mouse click, as a person does
    lab.wait_for(lambda: "Stop button pressed" in _text(status), 60, "the widget saying stopped")
    first = _text(status)
    assert first.startswith("stopped") and first.count("Stop button pressed") == 1, first
    run_dir = _run_dir(first)
    _assert_saved(run_dir)
    steps_at_stop = int(re.search(r"step (\d+)", first.split(": run ")[1]).group(1))
    assert steps_at_stop < 100000
    assert "danger" not in (widget.locator(".minlm-progress .progress-bar").get_attribute("class") or "")
    lab.wait_idle(120)
    assert not lab.errors()
    assert all(_prompt(lab.cell(i)).startswith("[") and _prompt(lab.cell(i)) not in ("[ ]:", "[*]:")
               for i in (6, 7, 9))  # they ran, on the stopped run's result
    said = _text(resume_cell.locator(".jp-OutputArea-output"))
    assert f"stopped at step {steps_at_stop}" in said and "GO_ON = True" in said, said
    assert resume_cell.locator(".minlm-status").count() == 0  # no second training widget
    assert max(int(m) for p in run_dir.glob("checkpoint*.pt")
               for m in re.findall(r"\d+", p.stem)) == steps_at_stop


def _exchanges(cell) -> list[str]:
    """The chat transcript's lines ("you: ...", "assistant: ...") as the page shows them."""
    text = "\n".join(cell.locator(".jp-OutputArea-output").all_inner_texts())  # does not wait
    return [line.strip() for line in text.splitlines()
            if line.strip().startswith(("you:", "assistant:", "error:"))]


def _replied(cell, n: int) -> bool:
    """At least ``n`` assistant lines, the last of them with text (not the "…" placeholder)."""
    lines = [x for x in _exchanges(cell) if x.startswith("assistant:")]
    return len(lines) >= n and lines[-1] != "assistant: …"


@screenshot_on_failure
def test_chat_reply_appears(lab):
    lab.open("6_finetune_chat.ipynb")
    lab.run_all()
    chat = lab.cell(12)
    lab.wait_for(lambda: _replied(chat, 1), 400, "the reply to the cell's own chat.send()")
    lab.wait_idle(240)
    assert not lab.errors()
    box = chat.get_by_placeholder("message, then Enter")
    box.click()
    box.fill("Where is the park?")
    box.press("Enter")
    lab.wait_for(lambda: _replied(chat, 2), 120, "the streamed reply to Enter")
    assert "you: Where is the park?" in _exchanges(chat)
    box.fill("Thank you")
    chat.get_by_role("button", name="Send").click()
    lab.wait_for(lambda: _replied(chat, 3), 120, "the reply to Send")
    assert not [x for x in _exchanges(chat) if x.startswith("error:")]


@screenshot_on_failure
def test_inference_slider_and_generate(lab):
    lab.open("3_inference.ipynb")
    lab.run_all()
    lab.wait_idle(300)
    assert not lab.errors()
    sampler = lab.cell(6)
    sample = sampler.locator(".minlm-sample")  # the text alone: the output area also holds the sliders' readouts
    before = _text(sample)
    assert "Once upon a time, there was a little dog" in before, before
    label = sampler.locator(".widget-label", has_text="temperature")
    assert _text(label) == "temperature"  # not cut to "temperat…"
    assert label.evaluate("e => e.scrollWidth <= e.clientWidth")
    slider = sampler.locator(".widget-slider").filter(has_text="temperature")
    readout = slider.locator(".widget-readout")
    assert _text(readout) == "0.80", sampler.locator(".widget-slider").first.inner_html()[:1500]
    slider.locator(".noUi-handle").scroll_into_view_if_needed()  # Run All left the page below
    handle = slider.locator(".noUi-handle").bounding_box()
    page = lab.page
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(handle["x"] + handle["width"] / 2 + 60, handle["y"] + handle["height"] / 2, steps=5)
    page.mouse.up()
    lab.wait_for(lambda: float(_text(readout)) > 0.8, 10, "the slider to move")
    sampler.get_by_role("button", name="Generate").click()
    lab.wait_for(lambda: _text(sample) != before, 60, "new text after Generate")
    lab.wait_idle(60)
    assert "Once upon a time, there was a little dog" in _text(sample)
    streamed = _text(lab.cell(8).locator(".jp-OutputArea-output"))
    assert streamed.startswith("The little girl saw a big"), streamed  # the prompt, then the rest
    box = sampler.locator("textarea").first  # an emoji reads as itself, not as <0xF0><0x9F>...
    box.fill("A 🎈 for Tom")
    box.press("Tab")
    shown = _text(sample)
    sampler.get_by_role("button", name="Generate").click()
    lab.wait_for(lambda: _text(sample) != shown, 60, "the emoji prompt's text")
    assert _text(sample).startswith("A 🎈 for Tom") and "<0x" not in _text(sample), _text(sample)
