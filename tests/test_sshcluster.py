"""SSHCluster against real OpenSSH servers: one on 127.0.0.1, two in network namespaces."""

import os
import signal
import subprocess
import sys
import time
from concurrent.futures import as_completed

import psutil
import pytest

import miniray
from miniray.cluster.ssh import preflight as sshprep
from miniray.broker import connect
from miniray.errors import (SSHAuthError, SSHClusterError, SSHHostKeyError, SSHPreflightError,
                            SSHUnreachableError)
from miniray.cluster.ssh.cluster import parse_hosts
from miniray.cluster.ssh.checklist import Checklist
from support import wait_for

pytestmark = pytest.mark.timeout(90)

TESTS = os.path.dirname(os.path.abspath(__file__))


def where(x):
    """A task: which network namespace and which host's worker ran it."""
    time.sleep(0.01)
    return os.readlink("/proc/self/ns/net"), os.environ.get("MINIRAY_TEST_HOST"), x


def slow_where(x):
    time.sleep(0.3)
    return os.readlink("/proc/self/ns/net"), os.environ.get("MINIRAY_TEST_HOST"), x


def versions(_):
    import miniray as m

    return m.__version__, m.__file__, sys.executable


def nodes(*aliases, python=sys.executable, **kw):
    """NodeConfigs that mark each host's worker environment with its alias."""
    return [miniray.NodeConfig(a, python=python, env={"MINIRAY_TEST_HOST": a,
                                                      "PYTHONPATH": TESTS}, **kw)
            for a in aliases]


def job_event_kinds(ex):
    from miniray.client import observe

    r = connect(ex.redis_url)  # (ex.events() leaves its connection open: a ResourceWarning)
    try:
        return {e.kind for e in observe.iter_events(r, ex.keys, ex.job_id)}
    finally:
        r.close()


def listens_on_loopback_only(pid):
    proc = psutil.Process(pid)
    conns = proc.net_connections("inet") if hasattr(proc, "net_connections") \
        else proc.connections("inet")
    listening = [c.laddr for c in conns if c.status == psutil.CONN_LISTEN]
    return all(a.ip in ("127.0.0.1", "::1") for a in listening), listening


def test_tasks_run_on_every_host_and_close_leaves_nothing(lab, home):
    steps = []
    cluster = miniray.SSHCluster(nodes("h1", "h2", "loop"), slots=2,
                                 callback=lambda host, step: steps.append((host, step.name,
                                                                           step.state)))
    try:
        assert cluster.status.ready, str(cluster.status)
        for h in ("h1", "h2", "loop"):
            assert (h, "first heartbeat", "ok") in steps
        assert "first heartbeat" in str(cluster.status)
        assert "<table>" in cluster.status._repr_mimebundle_()["text/html"]
        with cluster.executor() as ex:
            results = list(ex.map(where, range(60)))
        assert [r[2] for r in results] == list(range(60))
        seen = {(ns, host) for ns, host, _ in results}
        assert seen == {(lab.netns_id(h), h) for h in ("h1", "h2", "loop")}
        assert {w["name"] for w in cluster.workers()} == {"h1", "h2", "loop"}
        # the server: a unix socket, nothing on a non-loopback address; no password in argv
        ok, listening = listens_on_loopback_only(cluster._own_server.proc.pid)
        assert ok, listening
        password = cluster._own_server.password
        for p in psutil.process_iter(["cmdline"]):
            assert password not in " ".join(p.info["cmdline"] or ()), p
        for h in cluster._hosts.values():  # the pty had echo off when the URL was typed
            assert h.command.tail and password not in "\n".join(h.command.tail)
        remote = {h: lab.miniray_processes(h) for h in ("h1", "h2")}
        assert all(remote.values()), remote
        loop_pid = cluster.worker_pids()["loop"]
    finally:
        cluster.close()
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and (lab.miniray_processes("h1") or
                                           lab.miniray_processes("h2") or
                                           psutil.pid_exists(loop_pid)):
        time.sleep(0.1)
    assert not lab.miniray_processes("h1") and not lab.miniray_processes("h2")
    assert not psutil.pid_exists(loop_pid) or psutil.Process(loop_pid).status() == "zombie"


def test_connection_errors_name_the_host(lab, home):
    with pytest.raises(SSHAuthError, match="badkey"):
        miniray.SSHCluster(nodes("badkey"))
    with pytest.raises(SSHHostKeyError, match="stranger.*not in known_hosts"):
        miniray.SSHCluster(nodes("stranger"))
    with pytest.raises(SSHUnreachableError, match="nobody"):
        miniray.SSHCluster(nodes("nobody"))
    # several hosts failing at once: one error, each host with its own
    with pytest.raises(SSHClusterError) as info:
        miniray.SSHCluster(nodes("badkey", "nobody", "h1"))
    err = info.value
    assert isinstance(err.errors["badkey"], SSHAuthError)
    assert isinstance(err.errors["nobody"], SSHUnreachableError)
    assert "h1" not in err.errors
    assert err.status.hosts["badkey"].state == "failed"
    assert "connected" in err.status.hosts["nobody"].reason
    assert not lab.miniray_processes("h1")


def test_connect_kwargs_are_paramikos_connect_keywords(lab, home):
    # badkey's ~/.ssh/config key is refused; the key given here is tried first and works,
    # with paramiko's own look_for_keys/allow_agent (the keywords Fabric passes through)
    kwargs = {"key_filename": [str(lab.root / "client_key")], "look_for_keys": False,
              "allow_agent": False, "timeout": 20}
    with miniray.SSHCluster(nodes("badkey"), slots=1, connect_kwargs=kwargs) as cluster:
        assert cluster.status.ready, str(cluster.status)
        with cluster.executor() as ex:
            assert ex.submit(where, 7).result(timeout=30)[2] == 7
    with pytest.raises(miniray.ConfigurationError,
                       match=r"'look_for_key' is not a keyword of paramiko's SSHClient.connect "
                             r"\(did you mean 'look_for_keys'\?\); it takes .*passphrase"):
        miniray.SSHCluster(nodes("h1"), connect_kwargs={"look_for_key": False})
    with pytest.raises(miniray.ConfigurationError) as info:  # a secret stays out of messages
        miniray.SSHCluster(nodes("h1"), connect_kwargs={"passphrase": "s3cret", "pasword": "x"})
    assert "'pasword'" in str(info.value) and "s3cret" not in str(info.value)
    with pytest.raises(miniray.ConfigurationError, match="'port' comes from the host.*host:port"):
        miniray.SSHCluster(nodes("h1"), connect_kwargs={"port": 2222})
    with pytest.raises(miniray.ConfigurationError, match="/no/such/key does not exist"):
        miniray.SSHCluster(nodes("h1"), connect_kwargs={"key_filename": "/no/such/key"})


def test_version_mismatch_lists_every_host_and_the_fix(lab, home, tmp_path):
    # a real other Python: the system one, without cloudpickle or miniray
    system = "/usr/bin/python3"
    if not os.path.exists(system):
        pytest.skip("no system /usr/bin/python3 to play the host's other Python")
    status, out = subprocess.getstatusoutput(f"{system} -c 'import cloudpickle'")
    if status == 0:
        pytest.skip("the system Python has cloudpickle: it is no mismatch")
    with pytest.raises(SSHPreflightError) as info:
        miniray.SSHCluster(nodes("h1", "h2", python=system))
    msg = str(info.value)
    assert "pre-flight failed on 2 host(s)" in msg
    for host in ("h1", "h2"):
        assert f"{host} ({system}): cloudpickle not installed" in msg
    assert "miniray not installed (notebook: " + miniray.__version__ in msg
    assert "install=True" in msg
    assert set(info.value.mismatches) == {"h1", "h2"}
    # a Python that does not exist is its own clear error
    with pytest.raises(SSHPreflightError, match="h1: cannot run /no/such/python.*not found"):
        miniray.SSHCluster(nodes("h1", python="/no/such/python"))


def _old_miniray_env(path):
    """A venv whose own site-packages has miniray 0.0.1 installed (on top of the test venv)."""
    import site

    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    py = path / "bin" / "python"
    sp = subprocess.check_output([py, "-c", "import sysconfig; print(sysconfig.get_paths()"
                                  "['purelib'])"], text=True).strip()
    layer = "; ".join(f"site.addsitedir({d!r})" for d in site.getsitepackages())
    with open(os.path.join(sp, "_layer.pth"), "w") as f:
        f.write(f"import site; {layer}\n")
    os.makedirs(os.path.join(sp, "miniray"))
    with open(os.path.join(sp, "miniray", "__init__.py"), "w") as f:
        f.write('__version__ = "0.0.1"\n')
    os.makedirs(os.path.join(sp, "miniray-0.0.1.dist-info"))
    with open(os.path.join(sp, "miniray-0.0.1.dist-info", "METADATA"), "w") as f:
        f.write("Metadata-Version: 2.1\nName: miniray\nVersion: 0.0.1\n")
    return str(py)


def test_install_puts_this_miniray_in_a_venv_on_the_host(lab, home, tmp_path):
    old = _old_miniray_env(tmp_path / "oldenv")
    with pytest.raises(SSHPreflightError, match=r"miniray 0\.0\.1 \(notebook: "):
        miniray.SSHCluster(nodes("h1", python=old))
    install_dir = str(tmp_path / "remote-cache")
    with miniray.SSHCluster(nodes("h1", "h2", python=old), slots=1, install=True,
                            install_dir=install_dir, timeout=120) as cluster:
        steps = {h: cluster.status.hosts[h].steps["installed"] for h in ("h1", "h2")}
        assert all(s.state == "ok" for s in steps.values()), str(cluster.status)
        with cluster.executor() as ex:
            got = set(ex.map(versions, range(8)))
    assert {v for v, _, _ in got} == {miniray.__version__}
    assert all(f.startswith(install_dir) and exe.startswith(install_dir) for _, f, exe in got)
    assert not lab.miniray_processes("h1") and not lab.miniray_processes("h2")


def test_a_dropped_host_has_its_tasks_requeued(lab, home, monkeypatch):
    from miniray.cluster.server import ServerProcess

    monkeypatch.setenv("MINIRAY_WORKER_DEAD_SECONDS", "1")
    monkeypatch.setenv("MINIRAY_HEARTBEAT_SECONDS", "0.2")
    server = ServerProcess(tcp=True)  # this time the tunnel leads to a TCP port on loopback
    try:
        with miniray.SSHCluster(nodes("h1", "h2"), slots=1, redis_url=server.url) as cluster:
            ok, listening = listens_on_loopback_only(server.proc.pid)
            assert ok and listening, listening  # a TCP server, on 127.0.0.1 only
            with cluster.executor() as ex:
                futures = [ex.submit(slow_where, i) for i in range(16)]
                for f in as_completed(futures):
                    if f.result()[1] == "h1":
                        break
                # h1's result can come before its next claim (straight to this client, see
                # miniray.values.inbox): drop it once it holds a task again
                r = connect(ex.redis_url)
                try:
                    wait_for(lambda: r.execute("HLEN", ex.keys.wip(f.worker)) > 0,
                             timeout=10, what="h1 to take its next task")
                finally:
                    r.close()
                lab.drop_connections("h1")  # the SSH connection dies mid-job
                results = [f.result(timeout=60) for f in futures]
                kinds = job_event_kinds(ex)
            assert sorted(r[2] for r in results) == list(range(16))
            assert {"h1", "h2"} <= {r[1] for r in results}
            assert "retried" in kinds or "lost" in kinds, kinds
            deadline = time.monotonic() + 10  # the worker there exits on its own
            while lab.miniray_processes("h1") and time.monotonic() < deadline:
                time.sleep(0.1)
            assert not lab.miniray_processes("h1")
            assert "h1" not in cluster.worker_pids()
        assert not lab.miniray_processes("h2")
    finally:
        server.close()


def test_killed_notebook_leaves_no_remote_worker(lab, home):
    code = ("import sys, time, miniray\n"
            f"c = miniray.SSHCluster([miniray.NodeConfig('h1', python={sys.executable!r})], "
            "slots=1)\n"
            "print('READY', flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "READY"
        assert lab.miniray_processes("h1")
        proc.kill()  # the kernel dies without a chance to clean up
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    deadline = time.monotonic() + 15
    while lab.miniray_processes("h1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lab.miniray_processes("h1")


def test_ssh_up_command(lab, home):
    env = dict(os.environ, PYTHONPATH=TESTS)
    proc = subprocess.Popen([sys.executable, "-m", "miniray.cli", "ssh-up", "h1=2",
                             "--python", sys.executable], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env)
    try:
        lines = []
        for line in proc.stdout:
            lines.append(line)
            if line.startswith("MINIRAY_REDIS_URL="):
                break
        out = "".join(lines)
        assert "h1: first heartbeat ok" in out, out
        assert lab.miniray_processes("h1")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    deadline = time.monotonic() + 10
    while lab.miniray_processes("h1") and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not lab.miniray_processes("h1")


def test_parse_hosts_and_checklist_text():
    got = parse_hosts(["gpu1=8", "me@gpu2", "me@h:2222=4", "ssh://me@h:2200", "gpu3:22",
                       "[::1]:2201=2"], slots=3, python="/py")
    assert [(n.host, n.user, n.port, n.slots, n.python) for n in got] == [
        ("gpu1", None, 22, 8, "/py"), ("gpu2", "me", 22, 3, "/py"),
        ("h", "me", 2222, 4, "/py"), ("h", "me", 2200, 3, "/py"), ("gpu3", None, 22, 3, "/py"),
        ("::1", None, 2201, 2, "/py")]
    # HOST:N is the port, never N slots; the old HOST:PORT:SLOTS says what to write instead
    with pytest.raises(miniray.ConfigurationError, match=r"write me@h:2222=4 for 4 slots"):
        parse_hosts(["me@h:2222:4"])
    for bad, why in [("h=0", "at least 1 slot"), ("h:70000", "not a TCP port"),
                     ("a b", "cannot read the host"), ("me@", "cannot read the host")]:
        with pytest.raises(miniray.ConfigurationError, match=why):
            parse_hosts([bad])
    c = Checklist(["a", "b"])
    c.begin("a", "connected")
    c.done("a", "connected", "10.0.0.1:22")
    c.fail("b", "connected", SSHUnreachableError("cannot reach b:\n  <refused>\nFix: start sshd",
                                                 "b"))
    text = str(c)  # the whole reason, its later lines indented under the host
    assert "[x] connected" in text and ("\n      -> connected: cannot reach b:\n"
                                        "           <refused>\n         Fix: start sshd") in text
    page = c._repr_html_()
    assert "white-space:pre-wrap" in page and page.count("Fix: start sshd") == 1, page
    assert "cannot reach b:\n  &lt;refused&gt;\nFix: start sshd" in page
    assert not c.ready and c.hosts["b"].state == "failed"
    assert sshprep.mismatches({"python": "3.10.1", "cloudpickle": None, "miniray": "0.1.0"},
                              {"python": "3.11.7", "cloudpickle": "3.1.2", "miniray": "0.1.0"}
                              ) == [("Python", "3.10.1", "3.11.7"), ("cloudpickle", None, "3.1.2")]
