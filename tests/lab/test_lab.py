"""JupyterLab in headless Chromium: open a notebook, run its plotting cell on the "pivot" kernel
through the UI (click the cell, Shift+Enter) and check that the figure is rendered.

Set-up, all private to the test: the kernelspec installed from the built binary into a private
JUPYTER_PATH (as tests/notebooks does), private Jupyter config/data/runtime/settings folders,
JupyterLab on 127.0.0.1 at a free port with a random token, and the system's Chromium and
chromedriver (Debian: apt-get install chromium chromium-driver, done here when they are missing;
nothing is downloaded by selenium). The test fails unless the cell's output area holds an
<img src="data:image/png..."> (or an <svg>) that has decoded and has a non-zero size. A screenshot is
saved as evidence, pass or fail: $PIVOT_LAB_SCREENSHOT, else lab.png in the test's tmp dir.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import nbformat
import pytest
from pivot_testing import built_binary

# Installed by `make labdeps` (tests/requirements-lab.txt): a missing package fails, never skips.
import jupyterlab  # noqa: E402,F401
from selenium import webdriver  # noqa: E402
from selenium.common.exceptions import TimeoutException, WebDriverException  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.action_chains import ActionChains  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.common.keys import Keys  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402


# The first cell of a warm kernel takes ~20-30 s; a cold build slot needs many minutes.
RUN_TIMEOUT = float(os.environ.get("PIVOT_TEST_STARTUP_TIMEOUT", "1500"))
SERVER_TIMEOUT = 180.0

PLOT_CELL = """\
let losses: Vec<f64> = (0..40).map(|i| 2.0 * (-(i as f64) / 12.0).exp() + 0.1).collect();
let fig: Figure = curves("training loss", "step", "loss", &[Series::from_values("train", &losses)])?;
fig"""


def kernel_bin() -> Path:
    return built_binary("pivot-kernel", "PIVOT_KERNEL_BIN")


def ensure_chromium() -> tuple[str, str]:
    """The system's chromium and chromedriver, installed with apt when missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        subprocess.run(
            "command -v chromium >/dev/null && command -v chromedriver >/dev/null || "
            "{ apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; }",
            shell=True,
            check=True,
        )
    chromium, driver = shutil.which("chromium"), shutil.which("chromedriver")
    assert chromium and driver, "apt-get install chromium chromium-driver did not provide chromium and chromedriver"
    return chromium, driver


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.metadata["kernelspec"] = {"name": "pivot", "display_name": "Rust (PIVOT)", "language": "rust"}
    nb.metadata["language_info"] = {"name": "rust", "file_extension": ".rs", "mimetype": "text/rust"}
    nb.cells = [nbformat.v4.new_code_cell(PLOT_CELL)]
    nbformat.write(nb, path)


class Lab:
    """A JupyterLab server on 127.0.0.1 with everything Jupyter reads kept under `home`."""

    def __init__(self, home: Path):
        self.home = home
        self.root = home / "notebooks"
        self.root.mkdir(parents=True)
        self.port = free_port()
        self.token = secrets.token_hex(16)
        self.url = f"http://127.0.0.1:{self.port}"
        # No "get notified about Jupyter news?" toast or update check (they would cover the screenshot).
        notes = home / "lab-settings" / "@jupyterlab" / "apputils-extension"
        notes.mkdir(parents=True)
        (notes / "notification.jupyterlab-settings").write_text('{"fetchNews": "false", "checkForUpdates": false}')
        jp = home / "jupyter-path"
        subprocess.run([str(kernel_bin()), "install", "--dir", str(jp / "kernels" / "pivot")], check=True, stdout=subprocess.DEVNULL)
        env = dict(os.environ)
        env.update(
            JUPYTER_PATH=str(jp),
            JUPYTER_CONFIG_DIR=str(home / "config"),
            JUPYTER_DATA_DIR=str(home / "data"),
            JUPYTER_RUNTIME_DIR=str(home / "runtime"),
            JUPYTERLAB_SETTINGS_DIR=str(home / "lab-settings"),
            JUPYTERLAB_WORKSPACES_DIR=str(home / "lab-workspaces"),
        )
        self.log_path = home / "jupyterlab.log"
        self.log = open(self.log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "jupyter", "lab", "--no-browser", "--allow-root", "--ip=127.0.0.1", f"--port={self.port}",
             "--ServerApp.port_retries=0", f"--IdentityProvider.token={self.token}", f"--ServerApp.root_dir={self.root}",
             "--LabApp.news_url=None", "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"],
            env=env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def wait_ready(self) -> None:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"jupyter lab exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                req = urllib.request.Request(f"{self.url}/api/status", headers={"Authorization": f"token {self.token}"})
                with urllib.request.urlopen(req, timeout=5) as r:
                    if r.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.5)  # polling interval, not an assertion
        raise AssertionError(f"jupyter lab did not answer in {SERVER_TIMEOUT:.0f} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 4000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-n:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)  # the server's own group: it and the kernels it started
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture
def lab(tmp_path):
    server = Lab(tmp_path / "lab")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
def browser(tmp_path):
    chromium, chromedriver = ensure_chromium()
    opts = webdriver.ChromeOptions()
    opts.binary_location = chromium
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu", "--window-size=1400,1000",
                f"--user-data-dir={tmp_path / 'chrome-profile'}", "--no-first-run", "--disable-extensions"):
        opts.add_argument(arg)
    os.environ.setdefault("SE_OFFLINE", "true")  # selenium-manager must never try to download a driver
    service = Service(executable_path=chromedriver, log_output=str(tmp_path / "chromedriver.log"))
    driver = webdriver.Chrome(options=opts, service=service)
    try:
        yield driver
    finally:
        driver.quit()


# What the cell shows: ("image", element) once a figure has decoded; ("no image", output text) when
# the cell has finished (its prompt shows a number) with no <img>/<svg> in its output; else None.
FIND_OUTPUT = """
const cell = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell');
if (!cell) return null;
const area = cell.querySelector('.jp-OutputArea');
const imgs = area ? [...area.querySelectorAll('.jp-OutputArea-output img')] : [];
const svgs = area ? [...area.querySelectorAll('.jp-OutputArea-output svg')] : [];
for (const img of imgs) if (img.complete && img.naturalWidth > 0) return ['image', img];
for (const svg of svgs) { const r = svg.getBoundingClientRect(); if (r.width > 0 && r.height > 0) return ['image', svg]; }
const prompt = (cell.querySelector('.jp-InputPrompt') || {}).textContent || '';
if (/\\[\\d+\\]/.test(prompt) && imgs.length === 0 && svgs.length === 0)
  return ['no image', (area ? area.textContent : '').slice(0, 3000) || '(empty output)'];
return null;
"""


KERNEL_STATUS = """
const ind = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-Notebook-ExecutionIndicator');
return ind ? ind.getAttribute('data-status') : null;
"""
PROMPT = """
const cell = document.querySelector('.jp-NotebookPanel:not(.lm-mod-hidden) .jp-CodeCell');
return cell ? (cell.querySelector('.jp-InputPrompt') || {}).textContent || '' : null;
"""


def test_lab_runs_a_plotting_cell_and_renders_the_figure(lab, browser, tmp_path, capsys):
    write_notebook(lab.root / "plot.ipynb")
    shot = Path(os.environ.get("PIVOT_LAB_SCREENSHOT") or tmp_path / "lab.png")
    shot.parent.mkdir(parents=True, exist_ok=True)
    driver = browser
    try:
        driver.get(f"{lab.url}/lab/tree/plot.ipynb?token={lab.token}")
        wait = WebDriverWait(driver, SERVER_TIMEOUT, poll_frequency=0.5)
        # The notebook is open with our kernel (no "Select Kernel" dialog: the spec was found).
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell .cm-content"))
        wait.until(lambda d: any("Rust (PIVOT)" in e.text for e in d.find_elements(By.CSS_SELECTOR, ".jp-NotebookPanel-toolbar .jp-KernelName, .jp-Toolbar-kernelName")))
        assert not driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog"), "JupyterLab opened a dialog: " + " / ".join(
            e.text for e in driver.find_elements(By.CSS_SELECTOR, ".jp-Dialog"))
        editor = driver.find_element(By.CSS_SELECTOR, ".jp-NotebookPanel .jp-CodeCell .cm-content")
        assert "curves(" in editor.text, f"the cell shows {editor.text!r}"
        # A cell run before the session has its kernel is dropped by JupyterLab: wait for "idle".
        WebDriverWait(driver, RUN_TIMEOUT, poll_frequency=0.5).until(lambda d: d.execute_script(KERNEL_STATUS) == "idle")
        # Run it the way a user does: click into the cell, Shift+Enter.
        editor.click()
        ActionChains(driver).key_down(Keys.SHIFT).send_keys(Keys.ENTER).key_up(Keys.SHIFT).perform()
        try:  # the prompt turns [*] (queued or running), then [1]
            WebDriverWait(driver, 60, poll_frequency=0.5).until(lambda d: re.search(r"\[(\*|\d+)\]", d.execute_script(PROMPT) or ""))
        except TimeoutException:
            raise AssertionError(f"Shift+Enter did not start the cell: its prompt is {driver.execute_script(PROMPT)!r}") from None
        state = WebDriverWait(driver, RUN_TIMEOUT, poll_frequency=1.0).until(lambda d: d.execute_script(FIND_OUTPUT))
        kind, found = state
        assert kind == "image", f"the cell finished in JupyterLab without rendering a figure; its output:\n{found}"
        driver.execute_script("arguments[0].scrollIntoView({block: 'center'});", found)
        info = driver.execute_script(
            "const e = arguments[0], r = e.getBoundingClientRect();"
            "return {tag: e.tagName.toLowerCase(), src: (e.getAttribute('src') || '').slice(0, 30),"
            " nw: e.naturalWidth || 0, nh: e.naturalHeight || 0, w: r.width, h: r.height,"
            " prompt: (e.closest('.jp-CodeCell').querySelector('.jp-InputPrompt') || {}).textContent};",
            found,
        )
        if info["tag"] == "img":
            assert info["src"].startswith("data:image/png;base64,"), info
            assert info["nw"] > 0 and info["nh"] > 0, f"the PNG did not decode: {info}"
        else:
            assert info["tag"] == "svg", info
        assert info["w"] > 0 and info["h"] > 0, f"the figure has no size on the page: {info}"
        # The figure (display_data) arrives before the execute reply that numbers the prompt.
        try:
            WebDriverWait(driver, 60, poll_frequency=0.5).until(lambda d: "[1]" in (d.execute_script(PROMPT) or ""))
        except TimeoutException:
            raise AssertionError(f"the figure rendered but the cell did not finish: its prompt is {driver.execute_script(PROMPT)!r}, not [1]") from None
    finally:
        try:
            driver.save_screenshot(str(shot))
        except WebDriverException:
            pass
        with capsys.disabled():
            print(f"\n[lab] screenshot: {shot}" + ("" if shot.exists() else " (none could be taken)"))
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000, "the screenshot is not a real PNG"
