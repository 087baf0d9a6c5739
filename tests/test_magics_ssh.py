"""%miniray up / %%miniray map / %miniray down through a real InteractiveShell against real
OpenSSH servers in network namespaces (tests/netns.py)."""

import re
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
    shell.run_line_magic("miniray", f"up h1=2 --python {sys.executable}")
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


def test_a_bad_host_is_a_usage_error_naming_it(lab, shell, capsys):
    with pytest.raises(UsageError, match=r"%miniray up: 1 of 1 host\(s\) failed \(nobody\)"):
        shell.run_line_magic("miniray", "up nobody")
    out = capsys.readouterr().out
    assert "[!] connected" in out and "cannot reach SSH server" in out, out  # the checklist
    with pytest.raises(UsageError, match=r"1 of 2 host\(s\) failed \(badkey\)"):
        shell.run_line_magic("miniray", f"up h1 badkey --python {sys.executable}")
    out = capsys.readouterr().out
    assert "SSH authentication to" in out, out
    assert re.search(r"(?m)^h1 +stopped +\[x\] connected", out), out  # the fine host, stopped
    assert magics(shell)._ssh is None and magics(shell).redis_url is None
    assert gone(lab, "h1")
    with pytest.raises(UsageError, match="HOST:PORT:SLOTS is no longer read.*h1:22=4"):
        shell.run_line_magic("miniray", "up h1:22:4")
    with pytest.raises(UsageError, match=r"failed \(h1:8\)"):  # HOST:N is a port, not slots
        shell.run_line_magic("miniray", "up h1:8")
    out = capsys.readouterr().out
    assert "Unable to connect to port 8" in out and "for 8 slots write h1=8" in out, out


def test_help_prints_every_option(shell, capsys):
    assert shell.run_line_magic("miniray", "up --help") is None  # printed, not an error
    out = capsys.readouterr().out
    for option in ("-n SLOTS, --slots SLOTS", "--python PATH", "--install", "--timeout S",
                   "-i FILE, --identity FILE", "--known-hosts FILE", "--accept-new-host-keys",
                   "USER@HOST:PORT, ssh://USER@HOST:PORT", "HOST=SLOTS"):
        assert option in out, (option, out)
    assert "HOST:N is always a port" in out


def test_identity_known_hosts_and_accepting_a_new_host_key(lab, shell, tmp_path, capsys):
    address, port, _ = lab.hosts["loop"]  # the sshd on 127.0.0.1:PORT, as users type it
    known = tmp_path / "known_hosts"
    known.write_text("")  # no host is known: its key must be checked, or accepted
    up = (f"up {lab.user}@{address}:{port} -i {lab.root / 'client_key'} "
          f"--known-hosts {known} -n 1 --python {sys.executable}")
    with pytest.raises(UsageError, match=r"1 of 1 host\(s\) failed"):
        shell.run_line_magic("miniray", up)
    out = capsys.readouterr().out
    assert "[!] connected" in out and "is not in known_hosts" in out, out
    assert f"-o UserKnownHostsFile={known}" in out and "--accept-new-host-keys" in out, out
    assert known.read_text() == ""

    shell.run_line_magic("miniray", up + " --accept-new-host-keys")
    out = capsys.readouterr().out
    assert "[x] first heartbeat" in out, out
    assert known.read_text() == f"[{address}]:{port} {lab.host_pub}\n"
    (row,) = magics(shell)._ssh.status.hosts.values()
    assert "new host key ssh-ed25519 SHA256:" in row.steps["connected"].detail
    assert f"recorded in {known}" in row.steps["connected"].detail
    assert magics(shell)._ssh.workers()[0]["slots"] == 1
    shell.run_line_magic("miniray", "down")
    capsys.readouterr()

    # a key that differs from the recorded one is refused, even with --accept-new-host-keys
    other = " ".join((lab.root / "other_key.pub").read_text().split()[:2])
    known.write_text(f"[{address}]:{port} {other}\n")
    with pytest.raises(UsageError, match="failed"):
        shell.run_line_magic("miniray", up + " --accept-new-host-keys")
    out = capsys.readouterr().out
    assert "has CHANGED" in out and f"ssh-keygen -R '[{address}]:{port}' -f {known}" in out, out
    assert known.read_text() == f"[{address}]:{port} {other}\n"


@pytest.mark.parametrize("kind", ["text", "widget"])
def test_a_failure_is_shown_once(lab, shell, monkeypatch, kind):
    from IPython.utils.capture import capture_output

    from jupyter_ext import ssh

    views = []
    if kind == "widget":
        pytest.importorskip("ipywidgets")

        class Recorded(ssh.ChecklistView):
            def __init__(self):
                super().__init__()
                views.append(self)

        monkeypatch.setattr(ssh, "ChecklistView", Recorded)
    monkeypatch.setattr(ssh, "widgets_available", lambda: kind == "widget")
    with capture_output() as cap:
        shell.run_cell(f"%miniray up nobody h1 --python {sys.executable}")
    shown = [cap.stdout, cap.stderr] + [v.widget.value for v in views]
    for out in cap.outputs:  # what display() sent (the widget's own text is in views)
        shown += [out.data.get("text/plain", ""), out.data.get("text/html", "")]
    seen = "\n".join(shown)
    reason = "cannot reach SSH server"
    assert seen.count(reason) == 1, seen
    assert "UsageError: %miniray up: 1 of 2 host(s) failed (nobody)" in cap.stderr, cap.stderr
    assert "check the host name, port and that sshd is running" in seen  # all of it
    assert magics(shell)._ssh is None
    if views:  # the host that was fine is marked as stopped with the rest
        assert "<b>h1</b> <span" in views[0].widget.value and "(stopped)" in seen
