"""The notebooks as a person meets them: JupyterLab 4 in headless Chromium, clicked with the mouse.

nbval runs cells without a front end, so it cannot see a click that never reaches a busy
kernel or a widget update the page drops. Here (MINLM_SMOKE=1, tiny models):
- ``2_train``: Run All, click Stop while ``wait()`` blocks -> checkpoint + weights, widget says
  stopped; the resume cell shows the same widget, and the toolbar's Interrupt stops it the same.
- ``6_finetune_chat``: Run All, type a message + Enter -> the reply text appears.
- ``3_inference``: drag the temperature slider, click Generate -> new text.
Failure screenshots go to ``test-artifacts/browser/``. Needs the Debian ``chromium`` package
(``.ci/run`` installs it and sets ``MINLM_REQUIRE_BROWSER=1``, so there a missing browser fails).
"""

from __future__ import annotations

import functools
import os
import re
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


@screenshot_on_failure
def test_train_stop_during_run_all_then_interrupt_the_resumed_run(lab):
    lab.open("2_train.ipynb")
    lab.run_all()
    widget, wait_cell, resume_cell = lab.cell(3), lab.cell(5), lab.cell(9)
    status = widget.locator(".minlm-status, .widget-vbox > .widget-html").first
    lab.wait_for(lambda: lab.running(5) and _step(_text(status)) >= 10, 180,
                 "training rows while `await widget` runs")
    widget.get_by_role("button", name="Stop").click()  # a mouse click, as a person does
    lab.wait_for(lambda: "Stop button pressed" in _text(status), 60, "the widget saying stopped")
    first = _text(status)
    assert first.startswith("stopped"), first
    run_dir = _run_dir(first)
    _assert_saved(run_dir)
    steps_at_stop = int(re.search(r"step (\d+)", first.split(": run ")[1]).group(1))
    assert steps_at_stop < 100000
    assert "danger" not in (widget.locator(".minlm-progress .progress-bar").get_attribute("class") or "")

    # Run All goes on: the resume cell shows the same widget, training from where it stopped
    more = resume_cell.locator(".minlm-status, .widget-vbox > .widget-html").first
    lab.wait_for(lambda: lab.running(9) and _step(_text(more)) > steps_at_stop, 180,
                 "the resumed run training")
    lab.interrupt()
    lab.wait_for(lambda: "interrupted (Interrupt)" in _text(more), 60,
                 "the resumed widget saying interrupted")
    resumed = _text(more)
    assert _run_dir(resumed) == run_dir
    _assert_saved(run_dir)
    ckpt_steps = [int(m) for p in run_dir.glob("checkpoint*.pt")
                  for m in re.findall(r"\d+", p.stem)]
    assert max(ckpt_steps, default=0) > steps_at_stop or (run_dir / "checkpoint.pt").exists()
    lab.wait_idle(60)
    assert not lab.errors()
    assert wait_cell.count() == 1


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
    output = sampler.locator(".jp-OutputArea-output").last
    before = _text(output)
    assert "Once upon a time, there was a little dog" in before, before
    label = sampler.locator(".widget-label", has_text="temperature")
    assert _text(label) == "temperature"  # not cut to "temperat…"
    assert label.evaluate("e => e.scrollWidth <= e.clientWidth")
    slider = sampler.locator(".widget-slider").filter(has_text="temperature")
    readout = slider.locator(".widget-readout")
    assert _text(readout) == "0.80", sampler.locator(".widget-slider").first.inner_html()[:1500]
    handle = slider.locator(".noUi-handle").bounding_box()
    page = lab.page
    page.mouse.move(handle["x"] + handle["width"] / 2, handle["y"] + handle["height"] / 2)
    page.mouse.down()
    page.mouse.move(handle["x"] + handle["width"] / 2 + 60, handle["y"] + handle["height"] / 2, steps=5)
    page.mouse.up()
    lab.wait_for(lambda: float(_text(readout)) > 0.8, 10, "the slider to move")
    sampler.get_by_role("button", name="Generate").click()
    lab.wait_for(lambda: _text(output) != before, 60, "new text after Generate")
    assert "Once upon a time, there was a little dog" in _text(output)
