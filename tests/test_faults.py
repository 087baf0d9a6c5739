"""Fault injection against real workers: task errors, crashes, limits, lost workers and servers."""

import functools
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time

import psutil
import pytest

import miniray
import tasks
from support import ROOT, TESTS, own_server, wait_for as _wait_for, worker_env
from miniray.keys import Keys
from miniray.errors import (
    MemoryLimitError,
    RemoteTraceback,
    SerializationError,
    ServerLostError,
    TaskCrashedError,
    TaskTimeoutError,
    WorkerLostError,
)

pytestmark = pytest.mark.timeout(60)


def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


# -- a task's own exception --------------------------------------------------------------------
def test_task_exception_comes_back_as_itself(one_worker):
    with one_worker.executor() as ex:
        f = ex.submit(tasks.raise_custom, "boom", 42)
        exc = f.exception(timeout=30)
    assert type(exc) is tasks.CustomError
    assert exc.args == ("boom", 42) and exc.code == 42
    assert isinstance(exc.__cause__, RemoteTraceback)
    assert "raise_custom" in str(exc.__cause__)
    note = "\n".join(getattr(exc, "__notes__", [])) + str(exc.__cause__)
    info = f.host, f.task_id
    assert f.host and f.host in note
    assert f"task {f.task_id}" in note
    assert "pid " in note, info
    with pytest.raises(tasks.CustomError):
        f.result()


def test_remote_traceback_keeps_the_users_frames_only(one_worker):
    """In a terminal the chained traceback shows the task's own lines, not miniray's loop."""
    with one_worker.executor() as ex:
        with pytest.raises(ValueError) as info:
            list(ex.map(tasks.raise_value_error, range(6)))
    exc = info.value
    text = str(exc.__cause__)
    assert re.search(r'File ".*tests/tasks\.py", line \d+, in raise_value_error\n'
                     r'    raise ValueError\(f"bad item \{x\}"\)\n'
                     r'ValueError: bad item 3', text), text
    # the package's own folder, not "miniray/": a clone's folder is named miniray too
    package = os.path.dirname(miniray.__file__) + os.sep
    for internal in ("taskproc", "cloudpickle", "<dynamic-code>", package):
        assert internal not in text, (internal, text)
    # the frames as data, for a frontend to show as its own, and the item it failed on
    (frame,) = exc.__cause__.frames
    assert frame[0].endswith("tests/tasks.py") and frame[2] == "raise_value_error", frame
    assert "[miniray] raised by task 3 (argument 3) of job" in "\n".join(exc.__notes__)


# -- crashes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [tasks.segfault, tasks.hard_exit], ids=["segfault", "os._exit"])
def test_crashing_task_fails_and_worker_lives_on(one_worker, fn):
    with one_worker.executor() as ex:
        exc = ex.submit(fn).exception(timeout=30)
        assert isinstance(exc, TaskCrashedError), exc
        assert "solo" in str(exc)
        after = ex.submit(tasks.where).result(timeout=30)
    assert after["pid"] > 0
    assert one_worker.procs[0].poll() is None
    assert len(one_worker.workers()) == 1


def test_a_crash_inside_a_chunk_fails_that_item_and_runs_the_rest(one_worker, tmp_path):
    """The process claims the chunk and runs it before its worker hears of it (the news goes
    with the outcomes): the worker learns from the shared page which item was running, and
    does not run it again."""
    log = tmp_path / "runs"
    with one_worker.executor() as ex:
        fn = functools.partial(tasks.exit_on, bad=3, log=str(log))
        futures = ex.map_futures(fn, range(6), chunksize=6)
        exc = futures[3].exception(timeout=30)
        assert isinstance(exc, TaskCrashedError), exc
        assert [f.result(timeout=30) for i, f in enumerate(futures) if i != 3] == [0, 1, 2, 4, 5]
        assert ex.progress()["failed"] == 1
        assert log.read_text().split().count("3") == 1
        # a second crash, now in a chunk the worker sent itself after the first
        assert isinstance(ex.submit(tasks.hard_exit).exception(timeout=30), TaskCrashedError)
        assert ex.submit(tasks.square, 7).result(timeout=30) == 49


def test_a_chunk_handed_to_a_process_that_dies_before_claiming_it_runs_once(one_worker,
                                                                           tmp_path):
    """A submit hands its chunk to the slot that went idle last, for that slot's next claim.
    If the slot's process dies first, its worker runs the chunk in the next process (from
    ``wip``), and the hand-over is gone: that process must not claim it a second time."""
    from miniray.broker import connect

    pidfile, runs = tmp_path / "pid", tmp_path / "runs"
    with one_worker.executor() as ex:
        busy = ex.submit(tasks.pid_then_sleep, str(pidfile), 30)
        _wait_for(lambda: pidfile.exists() and pidfile.read_text(), what="the task to start")
        # the slot as it is between going idle and its claim: registered, not claiming yet
        r = connect(one_worker.url)
        waiter = Keys.waiter(one_worker.workers()[0]["id"], 0)
        r.execute("ZADD", ex.keys.idle, time.time(), waiter)
        handed = ex.submit(tasks.record_run, str(runs), "ran")
        _wait_for(lambda: r.execute("LLEN", ex.keys.hand(waiter)), what="the hand-over")
        os.kill(int(pidfile.read_text()), signal.SIGKILL)
        assert isinstance(busy.exception(timeout=30), TaskCrashedError)
        assert handed.result(timeout=30) == "ran"
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9  # (after any second run)
        assert len(runs.read_text().split()) == 1
        r.close()


# -- limits ------------------------------------------------------------------------------------
def test_memory_limit(one_worker):
    with one_worker.executor(limits=miniray.Limits(memory_gb=0.2)) as ex:
        exc = ex.submit(tasks.allocate, 600).exception(timeout=30)
        assert isinstance(exc, MemoryLimitError) and isinstance(exc, MemoryError), exc
        assert "memory_gb=0.2" in str(exc)
        # the worker replaced the task process; small tasks still run under the limit
        assert ex.submit(tasks.allocate, 10).result(timeout=30) == 10 * 1024 * 1024


def test_jobs_that_alternate_limits_keep_a_process_each(one_worker):
    """A slot keeps the process of the limits it left (paused): jobs that take turns reuse
    their warm processes instead of starting one at every switch."""
    limited = one_worker.executor(limits=miniray.Limits(memory_gb=1))
    plain = one_worker.executor()
    with limited, plain:
        pids = {"limited": set(), "plain": set()}
        for _ in range(3):
            for name, ex in (("limited", limited), ("plain", plain)):
                pids[name].add(ex.submit(tasks.where).result(timeout=30)["pid"])
    assert len(pids["limited"]) == 1 and len(pids["plain"]) == 1
    assert pids["limited"] != pids["plain"]


def test_jobs_with_other_limits_take_turns_on_one_slot(one_worker):
    """A slot's process runs one set of limits: a job with others makes the worker replace it
    once what it holds is done. It must hear of all of that (here the process had claimed
    more chunks of the limited job by itself before it met the plain one)."""
    limited = one_worker.executor(limits=miniray.Limits(memory_gb=1))
    plain = one_worker.executor()
    with limited, plain:
        for ex in (limited, plain, limited, plain):
            assert list(ex.map(tasks.square, range(8), timeout=30)) == [x * x for x in range(8)]
        futures = [ex.submit(tasks.square, i) for i, ex in enumerate([limited, plain] * 3)]
        assert [f.result(timeout=30) for f in futures] == [i * i for i in range(6)]


def test_timeout_kills_the_process_tree(one_worker, tmp_path):
    pidfile = tmp_path / "child.pid"
    with one_worker.executor(limits=miniray.Limits(timeout_seconds=0.5)) as ex:
        exc = ex.submit(tasks.spawn_sleeper_pidfile, str(pidfile), 30).exception(timeout=30)
        assert isinstance(exc, TaskTimeoutError) and isinstance(exc, TimeoutError), exc
        assert "timeout_seconds=0.5" in str(exc)
        child = int(pidfile.read_text())
        _wait_for(lambda: _gone(child), what=f"grandchild {child} to die")
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9


# -- lost workers ------------------------------------------------------------------------------
@pytest.fixture
def fast_reaping(cluster, monkeypatch):
    for k, v in {"MINIRAY_WORKER_DEAD_SECONDS": "2.5", "MINIRAY_MAX_RETRIES": "1"}.items():
        monkeypatch.setenv(k, v)
        cluster.env_extra[k] = v
    cluster.start_worker(name="w0", wait=False)
    cluster.start_worker(name="w1", wait=False)
    cluster.wait_workers(2)
    return cluster


def test_worker_killed_mid_task_is_retried_once(fast_reaping, tmp_path):
    runs = tmp_path / "runs.txt"
    completions = []
    with fast_reaping.executor() as ex:
        f = ex.submit(tasks.record_run, str(runs), "survived", 2.0)
        f.add_done_callback(completions.append)
        _wait_for(lambda: runs.exists() and runs.read_text().strip(), what="the first run")
        victim = int(runs.read_text().split()[0])
        os.kill(victim, signal.SIGKILL)
        assert f.result(timeout=30) == "survived"
        events = [e.kind for e in ex.events()]
    pids = runs.read_text().split()
    assert len(pids) == 2 and pids[0] != pids[1], pids
    assert completions == [f]
    assert "retried" in events


def test_task_that_keeps_killing_workers_fails_with_worker_lost(fast_reaping):
    with fast_reaping.executor() as ex:
        f = ex.submit(tasks.kill_my_worker)
        exc = f.exception(timeout=40)
    assert isinstance(exc, WorkerLostError), exc
    assert "MINIRAY_MAX_RETRIES" in str(exc)
    assert all(p.poll() is not None for p in fast_reaping.procs)


def test_departed_workers_leave_no_wake_ups_behind(fast_reaping):
    """A slot waiting for work is registered in ``idle`` with a wake-up list of its own. A
    worker that leaves (SIGTERM) or dies (SIGKILL, then reaped) takes both with it, and work
    published afterwards goes to a live worker."""
    from miniray.broker import connect
    from miniray.keys import Keys

    keys = Keys(fast_reaping.namespace)
    r = connect(fast_reaping.url)
    ids = {w["name"]: w["id"] for w in fast_reaping.workers()}

    def waiting(name):
        members = [m.decode() for m in r.execute("ZRANGE", keys.idle, 0, -1)]
        wakes = [k.decode() for k in r.execute("KEYS", keys.wake(ids[name] + "/*"))]
        return [m for m in members if m.startswith(ids[name] + "/")] + wakes

    _wait_for(lambda: waiting("w0") and waiting("w1"), what="both workers' slots to wait")
    with fast_reaping.executor() as ex:  # wake-ups come and go
        assert list(ex.map(tasks.identity, range(4))) == [0, 1, 2, 3]
    left, killed = fast_reaping.procs
    left.terminate()
    left.wait(10)
    assert waiting("w0") == []
    killed.kill()
    killed.wait(10)
    fast_reaping.start_worker(name="w2", wait=False)  # it reaps w1 once w1's heartbeat is old
    _wait_for(lambda: "w1" not in {w["name"] for w in fast_reaping.workers()}, timeout=30,
              what="w1 to be reaped")
    assert waiting("w1") == []
    with fast_reaping.executor() as ex:
        f = ex.submit(tasks.identity, 5)
        assert f.result(timeout=10) == 5
    assert f.worker == {w["name"]: w["id"] for w in fast_reaping.workers()}["w2"]
    r.close()


# -- lost server -------------------------------------------------------------------------------
def test_server_killed_fails_pending_futures(tmp_path, monkeypatch):
    with own_server(tmp_path, monkeypatch, "lostsrv") as srv:
        ex = miniray.Executor(redis_url=srv.url)
        futures = [ex.submit(tasks.sleep_then, 30, i) for i in range(4)]
        time.sleep(0.5)
        srv.proc.kill()
        srv.proc.wait()
        for f in futures:
            assert isinstance(f.exception(timeout=30), ServerLostError)
        with pytest.raises(miniray.ServerLostError):
            ex.submit(tasks.noop)
        ex.shutdown(wait=True)


def test_a_hung_server_does_not_hold_result_past_its_timeout(tmp_path, monkeypatch):
    """A server that stops answering (SIGSTOP): submit does not wait, result(timeout) still
    returns at its deadline; once the server answers again the results arrive, nothing lost.
    A task already running on this machine delivers meanwhile (straight to the client)."""
    with own_server(tmp_path, monkeypatch, "hung") as srv, \
            miniray.Executor(redis_url=srv.url) as ex:
        assert ex.submit(tasks.square, 2).result(timeout=30) == 4
        runs = tmp_path / "runs.txt"
        f = ex.submit(tasks.record_run, str(runs), "after", 0.5)
        _wait_for(lambda: runs.exists(), what="the task to start")
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            # submitting does not wait for the server (its upkeep is stuck by now)
            submitted = []
            t = threading.Thread(target=lambda: submitted.append(ex.submit(tasks.square, 3)))
            t.start()
            t.join(10)
            assert submitted, "submit waited for a hung server"
            with pytest.raises(TimeoutError):
                submitted[0].result(timeout=1.5)
            assert f.result(timeout=30) == "after"
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        assert submitted[0].result(timeout=30) == 9


# -- volume and size ---------------------------------------------------------------------------
def test_two_thousand_small_tasks(two_workers):
    with two_workers.executor() as ex:
        futures = [ex.submit(tasks.square, i) for i in range(2000)]
        assert [f.result(timeout=60) for f in futures] == [i * i for i in range(2000)]


def test_twenty_megabyte_argument_and_result(two_workers):
    blob = os.urandom(20 * 1024 * 1024)
    with two_workers.executor() as ex:
        assert ex.submit(tasks.echo_bytes, blob).result(timeout=30) == blob


# -- misuse and serialization ------------------------------------------------------------------
def test_submit_after_shutdown_raises(one_worker):
    ex = one_worker.executor()
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(tasks.noop)


def test_unpicklable_argument_and_function_fail_at_submit(one_worker):
    lock = threading.Lock()
    with one_worker.executor() as ex:
        with pytest.raises(SerializationError) as info:
            ex.submit(tasks.identity, lock)
        assert isinstance(info.value, TypeError)
        assert "cannot pickle argument 0 <unlocked _thread.lock" in str(info.value)
        with pytest.raises(SerializationError, match="cannot pickle the item <unlocked"):
            ex.map(tasks.identity, [1, lock])
        with pytest.raises(SerializationError, match=r"it uses `lock` \(a _thread.lock\)"):
            ex.submit(lambda: lock)
        assert ex.submit(tasks.square, 4).result(timeout=30) == 16


def test_unpicklable_result_and_exception_fail_their_futures(one_worker):
    with one_worker.executor() as ex:
        bad_result = ex.submit(tasks.return_unpicklable)
        bad_exc = ex.submit(tasks.raise_unpicklable)
        e1 = bad_result.exception(timeout=30)
        e2 = bad_exc.exception(timeout=30)
    assert isinstance(e1, SerializationError) and isinstance(e1, TypeError), e1
    assert isinstance(e2, SerializationError), e2
    assert "UnpicklableError" in str(e2)
    # in a chunk: only that item fails, the others arrive in their places
    with one_worker.executor() as ex:
        futures = ex.map_futures(functools.partial(tasks.unpicklable_at, bad=1), range(5),
                                 chunksize=5)
        assert isinstance(futures[1].exception(timeout=30), SerializationError)
        assert [f.result(timeout=30) for i, f in enumerate(futures) if i != 1] == [0, 2, 3, 4]


# -- clean exit --------------------------------------------------------------------------------
def test_local_cluster_leaves_no_process_behind():
    script = textwrap.dedent("""
        import miniray, miniray.cluster.local, tasks
        miniray.init(workers=2)
        with miniray.Executor() as ex:
            assert ex.submit(tasks.square, 7).result(timeout=60) == 49
        c = miniray.cluster.local._cluster
        print("PIDS", c.server.proc.pid, *c.worker_pids(), flush=True)
    """)
    env = dict(os.environ)
    for k in ("MINIRAY_REDIS_URL", "MINIRAY_NAMESPACE"):
        env.pop(k, None)
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    line = [x for x in out.stdout.splitlines() if x.startswith("PIDS")][0]
    pids = [int(p) for p in line.split()[1:]]
    assert len(pids) == 3
    _wait_for(lambda: all(_gone(p) for p in pids), timeout=10, what=f"{pids} to exit")


def test_server_restart_fails_old_jobs_and_workers_carry_on(tmp_path, monkeypatch):
    """A restarted (empty) server: the old executor fails cleanly, the worker reconnects,
    reloads its scripts and serves a new executor."""
    from miniray.cluster.server import ServerProcess

    srv = ServerProcess(tcp=True)
    ns = "restart"
    monkeypatch.setenv("MINIRAY_NAMESPACE", ns)
    log = open(tmp_path / "w.log", "ab")
    w = subprocess.Popen([sys.executable, "-m", "miniray.worker", "--name", "survivor"],
                         env=worker_env(srv.url, ns), stdout=log, stderr=log)
    srv2 = None
    try:
        old = miniray.Executor(redis_url=srv.url)
        assert old.submit(tasks.square, 3).result(timeout=30) == 9
        port, password = srv.port, srv.password
        srv.close()
        srv2 = ServerProcess(port=port, password=password)
        with pytest.raises(ServerLostError):  # at submit, or on the future: never a hang
            old.submit(tasks.square, 4).result(timeout=30)
        new = miniray.Executor(redis_url=srv2.url)
        assert new.submit(tasks.square, 5).result(timeout=30) == 25
        new.shutdown()
        assert w.poll() is None, "the worker survived the restart"
    finally:
        w.terminate()
        w.wait(10)
        (srv2 or srv).close()


def test_frozen_worker_is_taken_for_dead_and_nothing_is_counted_twice(cluster, monkeypatch):
    """SIGSTOP past the dead timeout: its tasks run elsewhere; when it wakes and finishes
    them too, every future still completes once and the job's counters stay exact."""
    monkeypatch.setenv("MINIRAY_WORKER_DEAD_SECONDS", "2")
    cluster.env_extra["MINIRAY_WORKER_DEAD_SECONDS"] = "2"
    frozen = cluster.start_worker(name="frozen", wait=False)
    cluster.start_worker(name="awake", wait=False)
    cluster.wait_workers(2)
    with cluster.executor() as ex:
        futures = [ex.submit(tasks.sleep_then, 1.0, i) for i in range(6)]
        _wait_for(lambda: ex.progress()["running"] >= 2, what="both workers busy")
        os.kill(frozen.pid, signal.SIGSTOP)
        try:
            _wait_for(lambda: any(e.kind == "retried" for e in ex.events()), timeout=30,
                      what="the frozen worker's tasks to be retried")
        finally:
            os.kill(frozen.pid, signal.SIGCONT)
        assert sorted(f.result(timeout=60) for f in futures) == list(range(6))
        _wait_for(lambda: ex.progress()["running"] == 0, what="nothing left running")
        p = ex.progress()
        assert (p["done"], p["failed"], p["queued"]) == (6, 0, 0), p
