"""An interrupt cancels the work, never the cluster: in a real kernel interrupted the way
JupyterLab does it (jupyter_client sends SIGINT to the kernel's whole process group), and in a
plain script that gets a terminal's Ctrl-C (SIGINT to its process group)."""

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from kernels import Kernel

pytestmark = pytest.mark.timeout(180)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def kernel():
    pytest.importorskip("ipykernel")
    pytest.importorskip("jupyter_client")
    k = Kernel()
    k.run("%load_ext miniray\n%miniray local -n 2")
    yield k
    k.close()


def _cluster_pids(kernel) -> tuple:
    out = kernel.run("from miniray.cluster import local as _l\n"
                     "print(_l._cluster.server.proc.pid, _l._cluster.server_alive(), "
                     "sorted(_l._cluster.worker_pids()))")
    return out["stream"].strip()


def test_kernel_interrupt_cancels_the_map_keeps_the_cluster_and_stops_run_all(kernel):
    before = _cluster_pids(kernel)
    assert " True " in before
    # "Run All": the map cell and the next one are queued together
    first = kernel.send("%%miniray map x in range(40) -o part\nimport time\ntime.sleep(0.5)\nx")
    second = kernel.send("ran_after_the_interrupt = True")
    t0 = [None]

    def interrupt_once_running(out):  # the widget is up: the map is running
        if t0[0] is None and out["data"]:
            t0[0] = time.monotonic()
        if t0[0] is not None and time.monotonic() - t0[0] > 2.5 and not out.get("sent"):
            out["sent"] = True
            kernel.km.interrupt_kernel()

    out = kernel.collect(first, timeout=90, on_output=interrupt_once_running)
    assert out["error"] is not None, out
    ename, tb = out["error"]
    assert ename == "KeyboardInterrupt"
    assert "cancelled by the interrupt" in tb and "so far are in part" in tb
    for internal in ("magics.py", "run_cell_magic", "Traceback"):
        assert internal not in tb, tb
    assert out["reply"]["content"]["status"] == "error"
    # the next queued cell was not run, as after any interrupted cell
    after = kernel.collect(second, timeout=30)
    assert after["reply"]["content"]["status"] == "aborted"
    # the partial results were kept
    got = kernel.run("print(len(part), sum(v is not None for v in part), "
                     "all(v is None or v == i for i, v in enumerate(part)))")["stream"].split()
    assert got[0] == "40" and 0 < int(got[1]) < 40 and got[2] == "True", got
    # the very same server and workers (not a restarted cluster) serve the next map
    assert _cluster_pids(kernel) == before
    out = kernel.run("%%miniray map x in range(6) -o again\nx * 3\n")
    assert kernel.run("print(again)")["stream"].strip() == "[0, 3, 6, 9, 12, 15]"
    status = kernel.run("%miniray status")["stream"]
    line = [ln for ln in status.splitlines() if "map x in range(40)" in ln]
    assert line and "cancelled" in line[0], status  # the job history survived, as it ended


def test_an_interrupt_while_a_big_map_is_submitted_leaves_nothing_behind(kernel):
    first = kernel.send("%%miniray map x in range(300000) -o big\nx")
    sent = []

    def interrupt_at_once(out):  # the view is displayed just before the items are sent
        if out["data"] and not sent:
            sent.append(True)
            kernel.km.interrupt_kernel()

    out = kernel.collect(first, timeout=90, on_output=interrupt_at_once)
    ename, tb = out["error"]
    assert ename == "KeyboardInterrupt" and "cancelled by the interrupt" in tb, tb
    assert "Traceback" not in tb and "executor.py" not in tb, tb
    # the cluster serves the next map, and the line magics still work on the cancelled run
    assert kernel.run("%%miniray map x in range(3)\nx")["data"][-1]["text/plain"] == "[0, 1, 2]"
    kernel.run("%miniray status")
    kernel.run("%miniray cancel")


def test_an_interrupt_while_the_view_is_being_shown_cancels_cleanly(kernel):
    # the SIGINT that jupyter_client sends, delivered at the one moment a timed interrupt
    # hits only now and then: right after the view went out, before any item was sent
    kernel.run("import os, signal\n"
               "from jupyter_ext.run import MapRun as _M\n"
               "_shown = _M._ipython_display_\n"
               "def _then_interrupt(self):\n"
               "    _shown(self)\n"
               "    os.kill(os.getpid(), signal.SIGINT)\n"
               "_M._ipython_display_ = _then_interrupt")
    try:
        out = kernel.collect(kernel.send("%%miniray map x in range(50) -o early\nx"),
                             timeout=60)
    finally:
        kernel.run("_M._ipython_display_ = _shown")
    ename, tb = out["error"]
    assert ename == "KeyboardInterrupt" and "still submitting" in tb, tb
    assert "Traceback" not in tb and "run.py" not in tb, tb
    status = kernel.run("%miniray status")["stream"]
    line = [ln for ln in status.splitlines() if "map x in range(50)" in ln]
    assert line and "running" not in line[0], status
    assert kernel.run("%%miniray map x in range(3)\nx")["data"][-1]["text/plain"] == "[0, 1, 2]"


# in a script: wait until both workers run one of the map's 60 s tasks, and say so
_READY = """\
    deadline = time.monotonic() + 60
    while ex.progress()["running"] < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    print("ready", ex.progress()["running"], flush=True)
"""

_SCRIPT = textwrap.dedent("""
    import os, sys, time
    import miniray

    cluster = miniray.init(workers=2)
    server = cluster.server.proc.pid
    ex = miniray.Executor()
    results = ex.map(time.sleep, [60] * 8)
{READY}    try:
        for _ in results:
            pass
    except KeyboardInterrupt:
        print("interrupted", flush=True)
    # running tasks of the map were stopped too: the workers are free again
    f = ex.submit(pow, 2, 5)
    print("next", f.result(timeout=45), flush=True)
    print("same-server", cluster.server_alive() and cluster.server.proc.pid == server,
          flush=True)
    ex.shutdown()
""".replace("{READY}", _READY))


def _ctrl_c(tmp_path, source: str, ready: str) -> list:
    """Run ``source`` as a script in its own process group (a job in a terminal), send the
    group SIGINT (Ctrl-C) once it prints ``ready``, and return the lines it printed."""
    script = tmp_path / "script.py"
    script.write_text(source)
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    env.pop("MINIRAY_REDIS_URL", None)
    p = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
    try:
        assert p.stdout.readline().strip() == ready
        time.sleep(1.0)  # from its print into the map's iteration, where Ctrl-C is meant
        os.killpg(p.pid, signal.SIGINT)
        out, err = p.communicate(timeout=150)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert p.returncode == 0, err
    return out.split("\n")


def test_ctrl_c_in_a_script_cancels_the_maps_running_tasks_and_keeps_the_executor(tmp_path):
    lines = _ctrl_c(tmp_path, _SCRIPT, "ready 2")
    assert "interrupted" in lines and "next 32" in lines and "same-server True" in lines, lines


_SCRIPT_OTHERS = textwrap.dedent("""
    import os, sys, time
    import miniray

    def slow_double(x):
        time.sleep(1)
        return 2 * x

    cluster = miniray.init(workers=2)
    server, workers = cluster.server.proc.pid, sorted(cluster.worker_pids())
    ex = miniray.Executor()
    results = ex.map(time.sleep, [60] * 4)
    other = ex.submit(slow_double, 21)  # queued behind the map's chunks
{READY}    try:
        for _ in results:
            pass
    except KeyboardInterrupt:
        print("interrupted", "other-done" if other.done() else "other-pending", flush=True)
    # the map's running tasks were stopped: the workers are free again; `other` went on
    print("other", other.result(timeout=45), flush=True)
    f = ex.submit(pow, 2, 5)
    print("next", f.result(timeout=45), flush=True)
    # the interrupted tasks have reported once their workers hold nothing
    r, k = ex._r, ex.keys
    while time.monotonic() < deadline and any(
            r.execute("HLEN", k.wip(w.decode())) for w in r.execute("ZRANGE", k.workers, 0, -1)):
        time.sleep(0.05)
    p = ex.progress()
    print("counts", p["done"], p["failed"], p["cancelled"], p["running"], p["queued"],
          flush=True)
    print("same-cluster", cluster.server_alive() and cluster.server.proc.pid == server
          and sorted(cluster.worker_pids()) == workers, flush=True)
    ex.shutdown()
""".replace("{READY}", _READY))


def test_ctrl_c_in_a_map_stops_its_running_tasks_while_other_futures_go_on(tmp_path):
    """With other futures of the executor pending, Ctrl-C in a map stops the map's own
    running tasks (not the whole job): the workers are free at once, the other future gets
    its real result, and the job counts the map's items as cancelled, not failed."""
    lines = _ctrl_c(tmp_path, _SCRIPT_OTHERS, "ready 2")
    assert "interrupted other-pending" in lines, lines
    assert "other 42" in lines and "next 32" in lines, lines
    # 4 map items cancelled; `other` and the next submit done; nothing failed
    assert "counts 2 0 4 0 0" in lines, lines
    assert "same-cluster True" in lines, lines


def test_the_local_cluster_still_dies_with_a_killed_kernel():
    """In their own sessions, the server and workers no longer share the kernel's signals,
    but they still end with it, even when it is SIGKILLed (parent-death signal)."""
    import psutil

    pytest.importorskip("ipykernel")
    k = Kernel()
    try:
        k.run("%load_ext miniray\n%miniray local -n 2")
        pids = [int(p) for p in k.run(
            "from miniray.cluster import local as _l\n"
            "print(_l._cluster.server.proc.pid, *_l._cluster.worker_pids())")["stream"].split()]
        server = psutil.Process(pids[0]).children()  # the shim exec'd into the server itself
        procs = [psutil.Process(p) for p in pids] + server
        # the kernel alone (not its group): no atexit, no shutdown, nothing signals the rest
        os.kill(k.km.provisioner.process.pid, signal.SIGKILL)
        gone, alive = psutil.wait_procs(procs, timeout=30)
        assert not alive, [p.pid for p in alive]
    finally:
        k.kc.stop_channels()
        k.km.shutdown_kernel(now=True)


def test_ctrl_c_in_the_middle_of_a_send_leaves_the_executor_in_step(tmp_path, monkeypatch):
    """A Ctrl-C while a submission's write is under way (here: the server is stopped, so the
    write blocks once the socket's buffers are full) comes when the write is whole: no half
    command on the connection, every future the loop got settles, nothing that nobody holds
    is waited for. Before: the next command's reply was read out of step, and shutdown
    hung."""
    import threading

    import miniray
    import tasks
    from support import own_server

    with own_server(tmp_path, monkeypatch, "cut", workers=1) as srv:
        ex = miniray.Executor(redis_url=srv.url)
        assert ex.submit(tasks.square, 3).result(timeout=60) == 9
        os.kill(srv.proc.pid, signal.SIGSTOP)
        ctrl_c = threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGINT))
        resume = threading.Timer(2.0, os.kill, (srv.proc.pid, signal.SIGCONT))
        payload, got = b"x" * 900_000, []  # (under the size that is sent apart)
        try:
            ctrl_c.start()
            resume.start()
            with pytest.raises(KeyboardInterrupt):
                for _ in range(1000):  # until the socket's buffers are full: a write blocks
                    got.append(ex.submit(len, payload))
        finally:
            ctrl_c.cancel()
            resume.join()
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert len(got) < 1000
        assert [f.result(timeout=60) for f in got] == [len(payload)] * len(got)
        assert ex.submit(tasks.square, 4).result(timeout=60) == 16
        closed = threading.Thread(target=ex.shutdown, kwargs={"wait": True})
        closed.start()
        closed.join(60)
        assert not closed.is_alive(), "shutdown(wait=True) waits for a future nobody holds"
