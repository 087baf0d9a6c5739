"""%miniray up / %%miniray map / %miniray down through a real InteractiveShell against real
OpenSSH servers in network namespaces (tests/netns.py)."""

import sys
import time

import pytest

pytest.importorskip("IPython")

from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

pytestmark = pytest.mark.timeout(60)

WHERE = "import os\n(os.readlink('/proc/self/ns/net'), x)"


@pytest.fixture
def shell(home):
    hooks = sys.displayhook, sys.excepthook
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "miniray")
    yield sh
    if magics(sh)._ssh is not None:
        sh.run_line_magic("miniray", "down")
    InteractiveShell.clear_instance()
    sys.displayhook, sys.excepthook = hooks


def magics(sh):
    return sh.magics_manager.registry["MinirayMagics"]


def gone(lab, *hosts, timeout=10):
    deadline = time.monotonic() + timeout
    while any(lab.miniray_processes(h) for h in hosts) and time.monotonic() < deadline:
        time.sleep(0.1)
    return not any(lab.miniray_processes(h) for h in hosts)


def test_up_map_runs_on_the_ssh_host_and_down_stops_it(lab, shell, capsys):
    shell.run_line_magic("miniray", f"up h1:2 --python {sys.executable}")
    out = capsys.readouterr().out
    assert "[x] first heartbeat" in out and "ready" in out, out  # the text checklist
    assert "1 SSH worker(s) up on h1" in out
    assert lab.miniray_processes("h1")
    assert magics(shell).redis_url == magics(shell)._ssh.url
    with pytest.raises(UsageError, match="already up"):
        shell.run_line_magic("miniray", "up h2")

    assert shell.run_cell_magic("miniray", "map x in range(8) -o out", WHERE) is None
    got = shell.user_ns["out"]
    assert [x for _, x in got] == list(range(8))
    assert {ns for ns, _ in got} == {lab.netns_id("h1")} != {lab.netns_id("loop")}
    shell.run_line_magic("miniray", "status")
    assert "HOST" in capsys.readouterr().out  # the workers table

    shell.run_line_magic("miniray", "down")
    assert "SSH workers on h1 stopped" in capsys.readouterr().out
    assert magics(shell)._ssh is None and magics(shell).redis_url is None
    assert gone(lab, "h1")


def test_live_widget_shows_every_host_and_step(lab, shell, monkeypatch):
    pytest.importorskip("ipywidgets")
    from jupyter_ext import ssh

    views = []

    class Recorded(ssh.ChecklistView):
        def __init__(self):
            super().__init__()
            views.append(self)

    monkeypatch.setattr(ssh, "ChecklistView", Recorded)
    monkeypatch.setattr(ssh, "widgets_available", lambda: True)
    shell.run_line_magic("miniray", f"up h1 h2 --slots 1 --python {sys.executable}")
    (view,) = views
    html = view.widget.value
    for text in ("h1", "h2", "connected", "checked", "installed", "tunnelled", "started",
                 "first heartbeat"):
        assert text in html, (text, html)
    assert html.count(">ok ") == 2 * 5 and html.count(">skipped") == 2, html
    got = shell.run_cell_magic("miniray", "map x in range(8)", WHERE)
    assert {ns for ns, _ in got} <= {lab.netns_id("h1"), lab.netns_id("h2")}
    shell.run_line_magic("miniray", "down")
    assert gone(lab, "h1", "h2")


def test_a_bad_host_is_a_usage_error_naming_it(lab, shell):
    with pytest.raises(UsageError, match=r"(?s)%miniray up: .*nobody.*\[!\] connected"):
        shell.run_line_magic("miniray", "up nobody")
    with pytest.raises(UsageError, match="badkey") as info:
        shell.run_line_magic("miniray", f"up h1 badkey --python {sys.executable}")
    assert "h1" in str(info.value)  # the checklist shows the host that was fine, too
    assert magics(shell)._ssh is None and magics(shell).redis_url is None
    assert gone(lab, "h1")
    with pytest.raises(UsageError, match="5000 slots"):
        shell.run_line_magic("miniray", "up h1:5000")
