"""End to end in a real browser: JupyterLab in headless Chromium (Debian's, driven by
Playwright) runs a notebook whose blocking ``%%miniray map`` streams log lines from two workers.
While it runs: the kernel shows busy, the log pane keeps the reader's place while lines arrive,
the worker filter works (in the browser: the kernel is busy), the dark theme reads well. When it
ends the widget leaves a static snapshot that survives saving and reloading the page.
Screenshots (light, dark, errors, reloaded) go to artifacts/."""

import json
import os
import re
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
    "%%miniray map x in range(80) -o out\n"
    "import time\n"
    "for k in range(5):\n"
    "    print(f'item {x} line {k}')\n"
    "    time.sleep(0.1)\n"
    "x * 2",
    "print('total', sum(out))",
    # a --bg map shown as the cell's value, cancelled with its button: its updater thread
    # leaves the snapshot
    "%%miniray map x in range(40) --bg\nimport time\ntime.sleep(0.5)\nx",
    # last, since an error stops "Run All": two items fail, the error table lists them
    "%%miniray map x in range(10) -o bad\n1 / (x % 5)",
]


def _requirements():
    if not os.path.exists(CHROMIUM):
        pytest.skip("Debian's chromium is not installed (apt-get install -y chromium)")
    for module in ("playwright", "jupyterlab", "ipywidgets", "jupyterlab_widgets", "anywidget"):
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


FIRST_VISIBLE = """pane => {
    for (const line of pane.children)
        if (line.offsetTop + line.offsetHeight > pane.scrollTop)
            return [Number(line.dataset.seq), line.offsetTop - pane.scrollTop];
    return null; }"""
LAST_SEQ = "pane => Math.max(-1, ...[...pane.children].map(l => Number(l.dataset.seq)))"
BUSY_STATUS_BAR = ("() => /\\| Busy/.test(document.querySelector('#jp-main-statusbar')"
                   ".textContent)")
RUNNING = ("() => { const s = document.querySelector('.miniray-map .miniray-state');"
           " return s && s.textContent.trim() === 'running'; }")


def _theme(page, name, light):
    page.evaluate("t => window.jupyterapp.commands.execute('apputils:change-theme', {theme: t})",
                  name)
    page.wait_for_function(f"() => document.body.dataset.jpThemeLight === '{light}'",
                           timeout=30_000)
    page.wait_for_timeout(500)  # the theme's stylesheet applies


def _luminance(page, locator, prop):
    """0 (black) .. 1 (white) of a computed colour."""
    rgb = locator.evaluate(f"el => getComputedStyle(el).{prop}")
    r, g, b = [float(v) for v in re.findall(r"[\d.]+", rgb)[:3]]
    return (0.299 * r + 0.587 * g + 0.114 * b) / 255


def test_live_view_then_static_snapshot_in_jupyterlab(lab):
    from playwright.sync_api import TimeoutError as PlaywrightTimeout
    from playwright.sync_api import sync_playwright

    os.makedirs(ARTIFACTS, exist_ok=True)
    shot = os.path.join(ARTIFACTS, "browser-miniray-{}.png").format
    found = {}
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
            pane = widget.locator(".miniray-logs")
            pane.wait_for(timeout=30_000)  # shown once there is output
            page.wait_for_function(
                "() => { const p = document.querySelector('.miniray-map .miniray-logs');"
                " return p && p.children.length >= 40 && p.scrollHeight > p.clientHeight; }",
                timeout=30_000)
            found["busy"] = page.locator(
                ".jp-Notebook-ExecutionIndicator[data-status='busy']").count()
            try:  # the status bar too (JupyterLab's subshell requests say idle: busy.py)
                page.wait_for_function(BUSY_STATUS_BAR, timeout=5_000)
                found["status_bar"] = "busy"
            except PlaywrightTimeout:
                found["status_bar"] = page.locator("#jp-main-statusbar").inner_text()
            found["following"] = pane.evaluate(
                "p => p.scrollHeight - p.scrollTop - p.clientHeight < 4")
            # the reader scrolls up: new lines arrive, the line they read stays where it was
            pane.evaluate(
                "p => { p.scrollTop = Math.floor((p.scrollHeight - p.clientHeight) / 2); }")
            before = pane.evaluate(FIRST_VISIBLE)
            last = pane.evaluate(LAST_SEQ)
            page.wait_for_function(
                f"() => {{ const p = document.querySelector('.miniray-map .miniray-logs');"
                f" return Math.max(...[...p.children].map(l => Number(l.dataset.seq)))"
                f" >= {last + 10}; }}", timeout=30_000)
            found["kept"] = (before, pane.evaluate(FIRST_VISIBLE))
            found["running_while_scrolled"] = page.evaluate(RUNNING)
            page.screenshot(path=shot("light"))
            # pick a worker: only its lines show, while the map is still running
            options = widget.locator(".miniray-filter option").all_inner_texts()
            chosen = options[1]
            widget.locator(".miniray-filter").select_option(chosen)
            last = pane.evaluate(LAST_SEQ)
            page.wait_for_function(
                f"() => {{ const p = document.querySelector('.miniray-map .miniray-logs');"
                f" return Math.max(...[...p.children].map(l => Number(l.dataset.seq)))"
                f" >= {last + 5}; }}", timeout=30_000)
            found["filtered"] = (chosen, pane.evaluate(
                "p => [...p.children].map(l => l.dataset.worker + ' ' + l.textContent)"))
            found["running_while_filtered"] = page.evaluate(RUNNING)
            page.wait_for_function(  # past the 200 lines the widget holds
                "() => /hidden/.test(document.querySelector('.miniray-map .miniray-log-note')"
                ".textContent)", timeout=30_000)
            found["note"] = widget.locator(".miniray-log-note").inner_text()
            _theme(page, "JupyterLab Dark", "false")
            widget.scroll_into_view_if_needed()
            page.screenshot(path=shot("dark"))
            found["dark"] = (_luminance(page, pane, "backgroundColor"),
                             _luminance(page, pane, "color"))
            found["dark_running"] = page.evaluate(RUNNING)
            # the end: the widget leaves its static snapshot
            page.get_by_text("total 6320").wait_for(timeout=60_000)
            snap = page.locator(".miniray-snapshot").first
            found["snapshot"] = snap.inner_text()
            found["dark_snapshot"] = _luminance(page, snap, "color")
            cancel = page.locator(".miniray-map .miniray-cancel").first  # the --bg map's
            cancel.click(timeout=30_000)
            page.wait_for_function(
                "() => document.querySelectorAll('.miniray-snapshot').length > 2",
                timeout=60_000)
            found["bg"] = page.locator(".miniray-snapshot").nth(1).inner_text()
            failing = page.locator(".miniray-snapshot").nth(2)
            failing.locator(".miniray-errors summary").first.click()
            found["errors"] = failing.locator(".miniray-errors").inner_text()
            failing.scroll_into_view_if_needed()
            page.screenshot(path=shot("dark-errors"))
            _theme(page, "JupyterLab Light", "true")
            page.screenshot(path=shot("light-errors"))
            # saved and reloaded: the snapshots are still there, no "model not found"
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']",
                                   timeout=60_000)
            page.evaluate("() => window.jupyterapp.commands.execute('docmanager:save')")
            page.wait_for_function(
                "() => !document.querySelector('.jp-mod-dirty')", timeout=30_000)
            page.reload()
            page.wait_for_function(
                "() => window.jupyterapp && document.querySelector('.jp-Notebook')",
                timeout=60_000)
            page.locator(".miniray-snapshot").nth(2).wait_for(timeout=60_000)
            page.screenshot(path=shot("reloaded"))
            found["reloaded"] = (page.locator(".miniray-snapshot").count(),
                                 page.locator(".miniray-map").count(),
                                 page.locator(".jp-Notebook").inner_text())
        finally:
            try:
                page.screenshot(path=shot("last"))
            finally:
                browser.close()
    assert found["busy"] == 1, "the kernel should show busy while a blocking map runs"
    assert found["status_bar"] == "busy", found["status_bar"]
    assert found["following"], "the pane follows new lines while the reader is at the bottom"
    (seq0, off0), (seq1, off1) = found["kept"]
    assert seq0 == seq1 and abs(off0 - off1) <= 2, found["kept"]
    assert found["running_while_scrolled"] and found["running_while_filtered"], found
    chosen, lines = found["filtered"]
    assert lines and all(ln.startswith(f"{chosen} [{chosen} #") for ln in lines), lines[:5]
    assert "earlier line(s) hidden: %miniray logs" in found["note"], found["note"]
    background, text = found["dark"]
    assert background < 0.35 and text > 0.6, found["dark"]  # light on dark, readable
    assert found["dark_snapshot"] > 0.6, found["dark_snapshot"]
    assert "80 done · 0 failed" in found["snapshot"] and "100%" in found["snapshot"], found
    assert "item 79 line 4" in found["snapshot"], found["snapshot"]
    assert "ZeroDivisionError × 2" in found["errors"] and "items 0, 5" in found["errors"]
    assert "traceback of item 0" in found["errors"] and "division by zero" in found["errors"]
    snapshots, widgets, text = found["reloaded"]
    assert "cancelled" in found["bg"] and "40 done" not in found["bg"], found["bg"]
    assert (snapshots, widgets) == (3, 0), found["reloaded"][:2]
    assert "model not found" not in text and "Error displaying widget" not in text
