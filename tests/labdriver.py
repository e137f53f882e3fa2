"""Drive the notebooks in a real JupyterLab with headless Chromium, as a person would.

``JupyterLab`` starts a server on 127.0.0.1 (free port, random token) over a copy of the
notebooks, with the kernel's environment carrying ``PYTHONPATH`` (this checkout),
``MINLM_SMOKE=1`` and ``MINLM_DATA_DIR``. ``Lab`` wraps a Playwright page: open a notebook, run
all cells from the menu, find a cell, wait for the kernel. Playwright's own browser download is
not used: the Debian ``chromium`` package is (``MINLM_CHROMIUM`` overrides its path).
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = os.environ.get("MINLM_CHROMIUM", "/usr/bin/chromium")
NOTEBOOK = ".jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook"  # the notebook on show
ARTIFACTS = REPO / "test-artifacts" / "browser"  # failure screenshots (CI keeps them)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class JupyterLab:
    """A JupyterLab server over ``root`` (a scratch folder holding copies of the notebooks)."""

    def __init__(self, root: Path, env: dict[str, str]):
        self.root, self.port, self.token = root, free_port(), secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        home = root.parent / "jupyter-home"  # no user settings, workspaces or news pop-ups
        for sub in ("config", "data", "runtime", "workspaces", "settings"):
            (home / sub).mkdir(parents=True, exist_ok=True)
        settings = {  # every cell rendered (not windowed), so the test can read any of them
            "notebook-extension/tracker": '{"windowingMode": "none"}',
            "apputils-extension/notification": '{"fetchNews": "false", "checkForUpdates": false}'}
        for name, value in settings.items():
            path = home / "settings" / "@jupyterlab" / f"{name}.jupyterlab-settings"
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(value)
        self.env = {**os.environ, **env, "JUPYTER_CONFIG_DIR": str(home / "config"),
                    "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
                    "JUPYTERLAB_SETTINGS_DIR": str(home / "settings")}
        self.log = open(root.parent / "jupyterlab.log", "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyterlab", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
             f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0",
             f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={root}",
             f"--LabApp.workspaces_dir={home / 'workspaces'}",
             f"--LabApp.user_settings_dir={home / 'settings'}",
             "--LabApp.news_url=None",
             "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate",
             "--LabApp.expose_app_in_browser=True"],  # window.jupyterapp, for errors()
            cwd=root, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        self._wait_ready(120)

    def _wait_ready(self, timeout: float) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.proc.poll() is not None:
                raise RuntimeError(f"JupyterLab exited with {self.proc.returncode}; see {self.log.name}")
            try:
                urllib.request.urlopen(f"{self.url}/api/status?token={self.token}", timeout=2)
                return
            except OSError:
                time.sleep(0.5)
        raise TimeoutError(f"JupyterLab did not answer on {self.url} within {timeout} s")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


def copy_notebooks(dest: Path, edits: dict[str, list[tuple[str, str]]] | None = None) -> Path:
    """Copy notebooks/ to ``dest`` (so autosave never touches the repo), applying text edits
    ``{name: [(old, new)]}`` to a notebook's JSON; each ``old`` must be present."""
    shutil.copytree(REPO / "notebooks", dest, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    for name, pairs in (edits or {}).items():
        path = dest / name
        text = path.read_text()
        for old, new in pairs:
            assert old in text, f"{name} no longer contains {old!r}; update the browser test"
            text = text.replace(old, new)
        path.write_text(text)
    return dest


_ERRORS_JS = """() => {
  const panel = window.jupyterapp.shell.currentWidget;
  const found = [];
  if (!panel || !panel.content || !panel.content.model) return found;
  for (const cell of panel.content.model.cells) {
    if (cell.type !== "code") continue;
    for (let i = 0; i < cell.outputs.length; i++) {
      const o = cell.outputs.get(i).toJSON();
      if (o.output_type === "error")
        found.push(`${o.ename}: ${o.evalue}\\n${(o.traceback || []).join("\\n")}`);
    }
  }
  return found;
}"""


class Lab:
    """One notebook open in JupyterLab, driven through the page's menus and the mouse."""

    def __init__(self, page, server: JupyterLab):
        self.page, self.server = page, server

    def open(self, name: str) -> None:
        # ?reset: a fresh workspace, so notebooks opened by earlier tests are not restored
        self.page.goto(f"{self.server.url}/lab/tree/{name}?reset&token={self.server.token}")
        self.page.wait_for_selector(f"{NOTEBOOK} .jp-Cell", timeout=120_000)
        end, quiet_since = time.monotonic() + 180, None
        while time.monotonic() < end:
            if self.accept_dialog() or self.kernel_status() != "idle":
                quiet_since = None
            elif quiet_since is None:
                quiet_since = time.monotonic()
            elif time.monotonic() - quiet_since > 3:  # idle, and no dialog came for 3 s
                break
            time.sleep(0.5)
        self.wait_idle(60)

    def accept_dialog(self) -> bool:
        """Accept a dialog if one is up (Lab may ask for the kernel the notebook names)."""
        accept = self.page.locator(".jp-Dialog .jp-mod-accept")
        if accept.count():
            accept.first.click()
            return True
        return False

    def kernel_status(self) -> str:
        return self.page.get_attribute(".jp-NotebookPanel:not(.lm-mod-hidden) "
                                       ".jp-Notebook-ExecutionIndicator", "data-status",
                                       timeout=10_000) or ""

    def wait_idle(self, timeout: float) -> None:
        """Until the kernel is idle and no cell waits to run."""
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            busy = self.page.locator(f"{NOTEBOOK} .jp-InputArea-prompt", has_text="[*]").count()
            if self.kernel_status() == "idle" and not busy:
                return
            time.sleep(0.5)
        raise TimeoutError(f"kernel still busy after {timeout} s")

    def menu(self, top: str, item: str) -> None:
        """Click a top menu, then one of its items, by their labels."""
        self.accept_dialog()
        self.page.locator(".lm-MenuBar-itemLabel", has_text=re.compile(f"^{top}$")).click()
        self.page.locator(".lm-Menu-itemLabel", has_text=re.compile(f"^{item}$")).click()

    def run_all(self) -> None:
        self.menu("Run", "Run All Cells")

    def interrupt(self) -> None:
        """The toolbar's Interrupt button (a square), clicked with the mouse."""
        self.page.locator('.jp-NotebookPanel-toolbar [data-command="notebook:interrupt-kernel"]'
                          ).first.click()

    def cell(self, index: int):
        return self.page.locator(f"{NOTEBOOK} .jp-Cell").nth(index)

    def running(self, index: int) -> bool:
        return "[*]" in "".join(self.cell(index).locator(".jp-InputArea-prompt").all_inner_texts())

    def errors(self) -> list[str]:
        """The error outputs of the notebook on show ("ename: evalue" and the traceback), read
        from its model: the page renders an error as application/vnd.jupyter.stderr, the same
        as a stderr stream, so the rendered page cannot tell them apart."""
        return self.page.evaluate(_ERRORS_JS)

    def wait_for(self, predicate, timeout: float, what: str) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if predicate():
                return
            errors = self.errors()
            assert not errors, f"a cell failed while waiting for {what}: {errors[0][-2000:]}"
            time.sleep(0.3)
        raise TimeoutError(f"{what}: not seen within {timeout} s")

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        self.page.screenshot(path=str(path), full_page=True)
        return path
