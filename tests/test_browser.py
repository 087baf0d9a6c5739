"""End to end in a real browser: JupyterLab in headless Chromium (Debian's, driven by
Playwright) runs a notebook with a ``%%miniray map`` over 200 items; the live widget must
render, reach 100% and show a worker's log line. A screenshot goes to artifacts/."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARTIFACTS = os.path.join(ROOT, "artifacts")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.timeout(180)

CELLS = [
    "%load_ext miniray",
    "%%miniray map x in range(200) -o out --chunksize 2\n"
    "import time\n"
    "time.sleep(0.02)\n"
    "print(f'item {x} is done')\n"
    "x * 2",
    "print('total', sum(out))",
    # last, since an error stops "Run All": two items fail, the error table lists them
    "%%miniray map x in range(10) -o bad\n1 / (x % 5)",
]


def _requirements():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    for module in ("playwright", "jupyterlab", "ipywidgets", "jupyterlab_widgets"):
        try:
            __import__(module)
        except ImportError:
            pytest.skip(f"{module} is not installed (pip install -e '.[test]')")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _notebook(path):
    import nbformat
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(c) for c in CELLS])
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3",
                                 "language": "python"}
    nbformat.write(nb, path)


def _start_kernel(base):
    """Open a session for the notebook over REST (non-GET calls need the _xsrf token), so
    the page attaches to a running kernel instead of asking which one to start."""
    import http.cookiejar

    jar = http.cookiejar.CookieJar()
    opener = urllib.request.build_opener(urllib.request.HTTPCookieProcessor(jar))
    opener.open(f"{base}/lab", timeout=30).read()
    xsrf = next((c.value for c in jar if c.name == "_xsrf"), "")
    body = {"path": "browser.ipynb", "name": "browser.ipynb", "type": "notebook",
            "kernel": {"name": "python3"}}
    req = urllib.request.Request(f"{base}/api/sessions", data=json.dumps(body).encode(),
                                 method="POST", headers={"X-XSRFToken": xsrf,
                                                         "Content-Type": "application/json"})
    with opener.open(req, timeout=60) as r:
        assert r.status in (200, 201), r.status


@pytest.fixture
def lab(tmp_path):
    _requirements()
    root = tmp_path / "lab"
    root.mkdir()
    _notebook(root / "browser.ipynb")
    port = _free_port()
    env = dict(os.environ)
    for var in ("MINIRAY_REDIS_URL", "MINIRAY_NAMESPACE"):
        env.pop(var, None)
    settings = tmp_path / "settings" / "@jupyterlab" / "apputils-extension"
    settings.mkdir(parents=True)
    (settings / "notification.jupyterlab-settings").write_text('{"fetchNews": "false"}')
    env.update(MINIRAY_LOCAL_WORKERS="2", JUPYTER_CONFIG_DIR=str(tmp_path / "config"),
               JUPYTER_RUNTIME_DIR=str(tmp_path / "runtime"),
               JUPYTERLAB_SETTINGS_DIR=str(tmp_path / "settings"),
               JUPYTERLAB_WORKSPACES_DIR=str(tmp_path / "workspaces"))
    log = open(tmp_path / "lab.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "jupyterlab", "--no-browser", f"--port={port}",
         "--ip=127.0.0.1", "--IdentityProvider.token=", "--ServerApp.password=",
         "--allow-root", f"--ServerApp.root_dir={root}", "--LabApp.expose_app_in_browser=True",
         "--LabApp.news_url=None", "--ServerApp.open_browser=False"],
        cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            with urllib.request.urlopen(f"{base}/api/status", timeout=2) as r:
                json.load(r)
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise AssertionError("JupyterLab did not start:\n"
                                     + (tmp_path / "lab.log").read_text()[-3000:])
            time.sleep(0.3)
    _start_kernel(base)
    yield base
    proc.terminate()
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()


def test_widget_renders_fills_and_streams_logs_in_jupyterlab(lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "browser-miniray-widget.png")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{lab}/lab/tree/browser.ipynb", timeout=60_000)
            page.wait_for_function(
                "() => window.jupyterapp && document.querySelector('.jp-Notebook')",
                timeout=60_000)
            # should JupyterLab still ask which kernel to use, take the one the notebook names
            accept = page.locator(".jp-Dialog .jp-mod-accept")
            try:
                accept.wait_for(timeout=3_000)
                accept.click()
            except PlaywrightTimeout:
                pass
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                                   timeout=60_000)
            # fire and forget: the command's promise settles only when every cell has run
            page.evaluate("() => { window.jupyterapp.commands.execute('runmenu:run-all'); }")
            widget = page.locator(".miniray-map").first
            widget.wait_for(timeout=60_000)
            try:  # a look at it mid-run (best effort: the map may finish first)
                page.wait_for_function(
                    "() => { const c = document.querySelector('.miniray-map .miniray-counts');"
                    " return c && /ETA/.test(c.textContent) && !/^0 done/.test(c.textContent); }",
                    timeout=10_000)
                page.screenshot(path=shot.replace(".png", "-running.png"))
            except PlaywrightTimeout:
                pass
            page.wait_for_function(
                "() => { const s = document.querySelector('.miniray-map .miniray-state');"
                " return s && s.textContent.trim() === 'done'; }", timeout=90_000)
            page.wait_for_function(
                "() => { const l = document.querySelector('.miniray-map .miniray-logs');"
                " return l && /\\[local-\\d+ #\\d+\\] item \\d+ is done/.test(l.textContent); }",
                timeout=30_000)
            page.get_by_text("total 39800").wait_for(timeout=30_000)
            counts = widget.locator(".miniray-counts").inner_text()
            bar = widget.locator(".miniray-bar .progress-bar")
            width = bar.evaluate("el => el.style.width")
            bar_class = bar.get_attribute("class")
            label = widget.locator(".miniray-bar .widget-label").inner_text()
            logs = widget.locator(".miniray-logs").inner_text()
            lanes = widget.locator(".miniray-lanes").inner_text()
            failing = page.locator(".miniray-map").nth(1)
            failing.wait_for(timeout=30_000)
            page.wait_for_function(
                "() => { const s = document.querySelectorAll('.miniray-map .miniray-state');"
                " return s.length > 1 && s[1].textContent.trim() === 'failed'; }",
                timeout=30_000)
            failing.locator(".miniray-errors summary").first.click()
            errors = failing.locator(".miniray-errors").inner_text()
            failing_bar = failing.locator(".miniray-bar .progress-bar").get_attribute("class")
            page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']"
                         ).last.wait_for(timeout=30_000)
            widget.scroll_into_view_if_needed()
        finally:
            try:
                page.screenshot(path=shot, full_page=False)
                print(f"screenshot: {shot}")
                if page.locator(".miniray-map").count() > 1:
                    page.locator(".miniray-map").nth(1).scroll_into_view_if_needed()
                    page.screenshot(path=shot.replace(".png", "-errors.png"))
                    print(f"screenshot: {shot.replace('.png', '-errors.png')}")
            finally:
                browser.close()
    assert "200 done" in counts and "0 failed" in counts, counts
    assert width == "100%", width
    assert "success" in bar_class, bar_class
    assert label.strip() == "100%", label
    assert "is done" in logs, logs
    assert "local-" in lanes, lanes
    assert "ZeroDivisionError × 2" in errors and "items 0, 5" in errors, errors
    assert "traceback of item 0" in errors and "division by zero" in errors, errors
    assert "danger" in failing_bar, failing_bar
