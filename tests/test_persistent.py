"""The persistent local cluster (``miniray.cluster.persistent``): a real background service, its
real server and workers, the CLI, plain Python processes and real Jupyter kernels; psutil checks
that nothing of it is left running."""

import json
import os
import re
import signal
import stat
import subprocess
import sys
import time

import psutil
import pytest

import tasks
from support import ROOT, TESTS, wait_for

pytestmark = pytest.mark.timeout(90)


def _tree(pid):
    """``pid`` and every process under it (server, workers, task processes)."""
    try:
        p = psutil.Process(pid)
        return [pid] + [c.pid for c in p.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _running(pids):
    alive = []
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                alive.append(pid)
        except psutil.NoSuchProcess:
            pass
    return alive


class _Dir:
    def __init__(self, path, track):
        self.path, self.track = path, track


@pytest.fixture
def cdir(tmp_path, monkeypatch):
    """A cluster directory of this test's own; whatever service it started is stopped at
    the end, even on failure, and nothing of it may be left running."""
    d = tmp_path / "clusters"
    monkeypatch.setenv("MINIRAY_CLUSTER_DIR", str(d))
    monkeypatch.delenv("MINIRAY_REDIS_URL", raising=False)
    monkeypatch.delenv("MINIRAY_NAMESPACE", raising=False)
    # the tests' task module is importable by the workers, as an installed module would be
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS, ROOT,
                                                      os.environ.get("PYTHONPATH", "")]))
    seen = set()

    def track():
        path = d / "cluster.json"
        if path.exists():
            seen.update(_tree(json.loads(path.read_text())["pid"]))

    yield _Dir(d, track)
    from miniray.cluster import local
    from miniray.cluster import persistent

    local._persist = None
    track()
    persistent.stop(timeout=5)
    wait_for(lambda: not _running(seen), 15, "every process of the persistent cluster to end")
    assert not (d / "cluster.json").exists()


def _cli(*args, env=None, timeout=60):
    out = subprocess.run([sys.executable, "-m", "miniray.cli", *args], capture_output=True,
                         text=True, timeout=timeout, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_up_detach_status_down_leaves_nothing(cdir):
    out = _cli("up", "--detach", "-n", "1")
    info = json.loads((cdir.path / "cluster.json").read_text())
    cdir.track()
    assert f"service pid {info['pid']}" in out and "1 of 1 worker(s) up" in out
    assert "miniray down" in out and str(cdir.path / "cluster.json") in out
    password = re.search(r"password=([^&]+)", info["url"]).group(1)
    assert password not in out  # never the password
    assert stat.S_IMODE(os.stat(cdir.path / "cluster.json").st_mode) == 0o600
    assert stat.S_IMODE(os.stat(cdir.path).st_mode) == 0o700
    tree = _tree(info["pid"])
    assert info["server_pid"] in tree and len(tree) >= 3  # service, server, worker

    # no --redis, no MINIRAY_REDIS_URL: status finds the persistent cluster
    status = _cli("status")
    assert status.startswith(f"persistent local cluster: service pid {info['pid']}")
    assert "workers: 1" in status and "local-0" in status
    assert "already running" in _cli("up", "--detach")  # a second up reuses it

    out = _cli("down")
    assert f"stopped (service pid {info['pid']}" in out
    assert not _running(tree)  # down waited for all of it
    assert not (cdir.path / "cluster.json").exists()
    assert "no persistent local cluster was running" in _cli("down")


_SCRIPT = """
import miniray, tasks
info = miniray.init(persist=True, workers=1)
with miniray.Executor() as ex:
    print(info.pid, info.server_pid, ex.redis_url == info.url, sum(ex.map(tasks.square, range(5))))
"""


def test_init_persist_is_shared_by_later_processes_and_scripts_keep_their_own(cdir):
    first = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                           timeout=60)
    assert first.returncode == 0, first.stderr
    cdir.track()
    pid, server_pid, used_it, total = first.stdout.split()
    assert (used_it, total) == ("True", "30")  # Executor() ran on the persistent cluster
    assert _running([int(pid), int(server_pid)])  # it outlived the process that started it
    second = subprocess.run([sys.executable, "-c", _SCRIPT], capture_output=True, text=True,
                            timeout=60)
    assert second.returncode == 0, second.stderr
    assert second.stdout.split() == [pid, server_pid, "True", "30"]  # the same service and server

    # a script that did not ask for it runs on an embedded cluster of its own, gone after it
    plain = subprocess.run(
        [sys.executable, "-c", "import miniray, miniray.cluster.persistent as p\n"
         "ex = miniray.Executor()\nprint(ex.redis_url == p.find().url, ex.submit(abs, -3)"
         ".result(timeout=30))\nex.shutdown()"], capture_output=True, text=True, timeout=60)
    assert plain.returncode == 0, plain.stderr
    assert plain.stdout.split() == ["False", "3"]


def test_processes_starting_at_once_get_one_cluster(cdir):
    code = "import miniray.cluster.persistent as p; print(p.start(workers=1).pid)"
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
             for _ in range(3)]
    outs = [p.communicate(timeout=60)[0].split() for p in procs]
    cdir.track()
    assert all(p.returncode == 0 for p in procs)
    assert len({o[0] for o in outs}) == 1  # one service, the same for all three
    services = [p.pid for p in psutil.process_iter()
                if "--serve" in _cmdline_of(p) and str(cdir.path) in _environ_of(p)]
    assert services == [int(outs[0][0])]


def _cmdline_of(p):
    try:
        return p.cmdline()
    except psutil.Error:
        return []


def _environ_of(p):
    try:
        return p.environ().get("MINIRAY_CLUSTER_DIR", "")
    except psutil.Error:
        return ""


def test_idle_stop_waits_for_running_work_then_stops(cdir, monkeypatch):
    import miniray
    from miniray.cluster import persistent

    monkeypatch.setenv("MINIRAY_IDLE_STOP_SECONDS", "3")
    info = persistent.start(workers=1)
    cdir.track()
    assert info.idle_stop_seconds == 3
    with miniray.Executor(redis_url=info.url) as ex:
        fut = ex.submit(tasks.sleep_then, 6, "slept")
        # twice the idle setting with a task running: still up
        assert fut.result(timeout=30) == "slept"
        assert persistent.find() is not None and info.alive()
    tree = _tree(info.pid)
    gone_at = time.monotonic()
    wait_for(lambda: not _running(tree), 20, "the idle service to stop")
    assert time.monotonic() - gone_at >= 1.5  # not at once: after the idle time
    assert persistent.find() is None and not (cdir.path / "cluster.json").exists()
    log = (cdir.path / "service.log").read_text()
    assert "idle for 3 s" in log and "stopped" in log


def test_busy_reasons_name_jobs_held_tasks_and_live_executors(cdir):
    import miniray
    from miniray.cluster import persistent
    from miniray.cluster import service as persistent_service
    from miniray.broker import Broker, connect

    info = persistent.start(workers=1, idle_seconds=0)
    cdir.track()
    r = connect(info.url)
    keys = Broker(r, "miniray").keys
    seen = {}
    assert persistent_service.busy_reasons(r, keys, seen) == []
    ex = miniray.Executor(redis_url=info.url)
    fut = ex.submit(tasks.sleep_then, 3, 1)
    wait_for(lambda: fut.running(), 20, "the task to start")
    reasons = " | ".join(persistent_service.busy_reasons(r, keys, seen))
    assert f"job {ex.job_id} is open" in reasons
    assert re.search(r"worker local-0\S* holds 1 chunk", reasons)
    assert f"executor {ex.client_id} is alive" in reasons
    assert fut.result(timeout=30) == 1
    ex.shutdown()
    time.sleep(1.2)
    assert persistent_service.busy_reasons(r, keys, seen) == []
    # a client key nobody renews (its executor was SIGKILLed) counts once, then no more
    r.execute("SET", keys.client("gone"), 1, "EX", 600)
    assert persistent_service.busy_reasons(r, keys, seen) == ["executor gone is alive"]
    time.sleep(0.3)
    assert persistent_service.busy_reasons(r, keys, seen) == []
    r.execute("SET", keys.client("gone"), 1, "EX", 600)  # renewed: alive again
    assert persistent_service.busy_reasons(r, keys, seen) == ["executor gone is alive"]
    r.close()


def test_sigkill_of_the_service_takes_its_cluster_and_find_drops_the_stale_file(cdir):
    from miniray.cluster import persistent

    info = persistent.start(workers=1)
    cdir.track()
    tree = _tree(info.pid)
    wait_for(lambda: len(_tree(info.pid)) >= 3, 20, "the worker to start")
    tree = _tree(info.pid)
    os.kill(info.pid, signal.SIGKILL)
    wait_for(lambda: not _running(tree), 20, "server and workers to die with their service")
    assert (cdir.path / "cluster.json").exists()  # a killed service cannot remove its file
    assert persistent.find() is None
    assert not (cdir.path / "cluster.json").exists()  # find() removed the stale file
    again = persistent.start(workers=1)  # and a new one starts in its place
    cdir.track()
    assert again.pid != info.pid and persistent.find() == again


def test_a_private_file_only(cdir):
    from miniray import ConfigurationError
    from miniray.cluster import persistent

    cdir.path.mkdir(mode=0o700)
    (cdir.path / "cluster.json").write_text("{}")
    os.chmod(cdir.path / "cluster.json", 0o644)
    with pytest.raises(ConfigurationError, match="not private to you"):
        persistent.find()
    os.unlink(cdir.path / "cluster.json")


@pytest.mark.timeout(150)
def test_kernels_find_the_persistent_cluster_and_down_stops_it(cdir):
    from kernels import Kernel

    k = Kernel()
    try:
        out = k.run("%load_ext miniray\n%miniray local --persist -n 1")
        assert "started the persistent local cluster" in out["stream"]
        out = k.run("%%miniray map x in range(3) -o first\nx + 1\n")
        out = k.run("print(first)")
        assert "[1, 2, 3]" in out["stream"]
    finally:
        k.kc.stop_channels()
        k.km.shutdown_kernel(now=True)  # no %miniray down: the cluster outlives the kernel
    info = json.loads((cdir.path / "cluster.json").read_text())
    cdir.track()
    tree = _tree(info["pid"])
    assert _running([info["pid"], info["server_pid"]])

    k = Kernel()
    try:
        # no %miniray local: the default finds the persistent cluster
        k.run("%load_ext miniray")
        out = k.run("%%miniray map x in range(4) -o second\nimport os\nos.getppid()\n")
        out = k.run("print(set(second))")
        (worker_pid,) = eval(out["stream"])
        assert worker_pid in tree  # its worker ran the items
        out = k.run("%miniray status")
        first = out["stream"].splitlines()[0]
        assert first.startswith("connected to the persistent local cluster since")
        assert f"service pid {info['pid']}" in first and "stops after 3600 s idle" in first
        out = k.run("%miniray down")
        assert f"persistent local cluster stopped (service pid {info['pid']}" in out["stream"]
        assert not _running(tree)
        assert not (cdir.path / "cluster.json").exists()
    finally:
        k.kc.stop_channels()
        k.km.shutdown_kernel(now=True)


@pytest.fixture
def shell():
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    hooks = sys.displayhook, sys.excepthook
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "miniray")
    yield sh
    sh.run_line_magic("miniray", "down")
    import miniray

    miniray.shutdown()
    InteractiveShell.clear_instance()
    sys.displayhook, sys.excepthook = hooks


def _ppids(sh):
    return set(sh.run_cell_magic("miniray", "map x in range(3)", "import os\nos.getppid()"))


def _status_line(sh, capsys):
    capsys.readouterr()
    sh.run_line_magic("miniray", "status")
    return capsys.readouterr().out.splitlines()[0]


def test_a_cluster_that_stopped_for_idleness_never_breaks_the_next_map(cdir, shell, capsys,
                                                                        monkeypatch):
    from miniray.cluster import persistent

    monkeypatch.setenv("MINIRAY_IDLE_STOP_SECONDS", "2")
    # the default: a running persistent cluster (another kernel's, a shell's) is used ...
    info = persistent.start(workers=1)
    cdir.track()
    assert _ppids(shell) <= set(_tree(info.pid))
    assert "the persistent local cluster" in _status_line(shell, capsys)
    wait_for(lambda: not info.alive(), 20, "the idle stop")
    # ... and once it stopped, the next map runs on this kernel's embedded cluster
    assert len(_ppids(shell)) >= 1 and persistent.find() is None
    assert "this kernel's embedded cluster" in _status_line(shell, capsys)

    # --persist: this kernel asked for it, so the next map starts it again
    shell.run_line_magic("miniray", "local --persist -n 1")
    first = persistent.find()
    cdir.track()
    wait_for(lambda: not first.alive(), 20, "the idle stop")
    ppids = _ppids(shell)
    again = persistent.find()
    cdir.track()
    assert again is not None and again.pid != first.pid and ppids <= set(_tree(again.pid))
    assert f"service pid {again.pid}" in _status_line(shell, capsys)


def test_a_bg_map_on_the_persistent_cluster_outlives_its_killed_kernel(cdir):
    """Issue 16's story: a kernel starts the persistent cluster and a --bg map of slow items
    and is SIGKILLed mid-map; a new kernel (no URL, no %miniray local) lists the job, its
    owner gone, attaches and gets every result in order; the workers never stopped."""
    pytest.importorskip("ipykernel")
    pytest.importorskip("jupyter_client")
    from kernels import Kernel

    from miniray.broker import connect
    from miniray.client.jobs import list_jobs
    from miniray.keys import Keys

    def job_row(job):
        r = connect(info["url"])
        try:
            return {j["job"]: j for j in list_jobs(r, Keys("miniray"))}[job]
        finally:
            r.close()

    def workers():
        return sorted(p.pid for p in psutil.Process(info["pid"]).children()
                      if "miniray.worker" in " ".join(p.cmdline()))

    first = Kernel()
    try:
        first.run("%load_ext miniray\n%miniray local --persist -n 2")
        info = json.loads((cdir.path / "cluster.json").read_text())
        cdir.track()
        before = workers()
        assert len(before) == 2
        first.run("%%miniray map x in range(12) -o run --bg\nimport time\ntime.sleep(1.0)\n"
                  "x * x")
        job = first.run("print(run.job)")["stream"].strip()
        wait_for(lambda: job_row(job)["done"] >= 2, 30, "two items done")
        os.kill(first.km.provisioner.process.pid, signal.SIGKILL)
    finally:
        first.kc.stop_channels()
        first.km.cleanup_resources()
    assert job_row(job)["done"] < 12  # killed mid-map
    wait_for(lambda: not job_row(job)["owner_alive"], 15, "the owner seen gone")
    second = Kernel()
    try:
        second.run("%load_ext miniray")
        listed = second.run("%miniray jobs")["stream"]
        row = [ln.split() for ln in listed.splitlines() if ln.strip().startswith(job)][0]
        assert row[-2:] == ["gone", "yes"], listed
        second.run(f"%miniray attach {job} -o out")
        assert second.run("print(out)")["stream"].strip() == str([x * x for x in range(12)])
        assert job_row(job)["state"] == "done"
        assert workers() == before  # the same worker processes ran it all
        second.run("%miniray down")
    finally:
        second.kc.stop_channels()
        second.km.shutdown_kernel(now=True)
