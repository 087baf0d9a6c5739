"""Every future settles: a paused client, a paused server, shutdown racing submissions, and
futures that say when they run. Real servers, real workers, real SIGSTOP/SIGCONT/SIGKILL."""

import functools
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time

import pytest

import miniray
import tasks
from support import own_server, wait_for, worker_env
from miniray.broker import connect
from miniray.keys import Keys

pytestmark = pytest.mark.timeout(150)


def _client(script: str, url: str, ns: str, **env) -> subprocess.Popen:
    """A client in a process of its own (so that it can be stopped), speaking JSON lines."""
    full = dict(os.environ)
    full.update(worker_env(url, ns), **{k: str(v) for k, v in env.items()})
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script)], env=full,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _line(proc) -> dict:
    line = proc.stdout.readline()
    assert line, f"the client exited: {proc.stderr.read()[-3000:]}"
    return json.loads(line)


def _pause(pid: int, seconds: float) -> float:
    """SIGSTOP ``pid`` for ``seconds``; return the wall-clock time of its SIGCONT."""
    os.kill(pid, signal.SIGSTOP)
    try:
        time.sleep(seconds)
    finally:
        os.kill(pid, signal.SIGCONT)
    return time.time()


# -- a paused client ---------------------------------------------------------------------------
_MAP_CLIENT = """
    import json, time, miniray, tasks
    ex = miniray.Executor()
    futures = [ex.submit(tasks.sleep_then, 4, i) for i in range(10)]
    print(json.dumps({"job": ex.job_id, "client": ex.client_id}), flush=True)
    out = [f.result(timeout=300) for f in futures]
    out += list(ex.map(tasks.square, range(5)))
    ex.shutdown()
    print(json.dumps({"results": out}), flush=True)
"""


def test_a_client_paused_longer_than_half_a_minute_finishes_its_map(cluster):
    """A laptop lid closed for 35 s while its tasks queue for 40 s of work: the job is not
    given up (the grace is 10 minutes), the results that came meanwhile wait for the client,
    and its map completes."""
    cluster.start_worker(name="w0")
    proc = _client(_MAP_CLIENT, cluster.url, cluster.namespace)
    try:
        first = _line(proc)
        wait_for(lambda: _job(cluster, first["job"]).get(b"running") == b"1",
                 what="the first task to start")
        _pause(proc.pid, 35)
        assert _line(proc)["results"] == list(range(10)) + [0, 1, 4, 9, 16]
        assert proc.wait(30) == 0
    finally:
        proc.kill()


_ABANDON_CLIENT = """
    import json, time, concurrent.futures as cf, miniray, tasks
    ex = miniray.Executor()
    futures = [ex.submit(tasks.sleep_then, 20, i) for i in range(3)]
    print(json.dumps({"job": ex.job_id, "client": ex.client_id}), flush=True)
    cf.wait(futures, timeout=120)
    settled = time.time()
    errors = [type(f.exception()).__name__ for f in futures]
    message = str(futures[0].exception())
    again = ex.submit(tasks.square, 7).result(timeout=60)
    print(json.dumps({"settled": settled, "errors": errors, "message": message,
                      "again": again, "job": ex.job_id}), flush=True)
    ex.shutdown()
"""


def test_a_client_paused_past_its_grace_fails_what_was_pending_and_goes_on(cluster):
    """Past the grace the cluster gives the job up: on resume every pending future fails
    promptly with JobAbandonedError saying why, and the executor still works (a new job)."""
    cluster.start_worker(name="w0")
    proc = _client(_ABANDON_CLIENT, cluster.url, cluster.namespace,
                   MINIRAY_CLIENT_GRACE_SECONDS=3)
    try:
        first = _line(proc)
        wait_for(lambda: _job(cluster, first["job"]).get(b"running") == b"1",
                 what="the first task to start")
        resumed = _pause(proc.pid, 8)
        out = _line(proc)
        assert out["errors"] == ["JobAbandonedError"] * 3, out
        assert "MINIRAY_CLIENT_GRACE_SECONDS" in out["message"] and "3 s" in out["message"]
        assert out["settled"] - resumed < 30, "pending futures settled long after the resume"
        assert out["again"] == 49 and out["job"] != first["job"]
        assert proc.wait(30) == 0
        old = _job(cluster, first["job"])
        assert old[b"state"] == b"orphaned", old
    finally:
        proc.kill()


def _job(cluster, job) -> dict:
    r = connect(cluster.url)
    try:
        flat = r.execute("HGETALL", Keys(cluster.namespace).job(job))
        return dict(zip(flat[::2], flat[1::2]))
    finally:
        r.close()


_DYING_CLIENT = """
    import json, miniray, tasks
    ex = miniray.Executor()
    futures = [ex.submit(tasks.sleep_then, 1.5, b"x" * 1000) for i in range(3)]
    print(json.dumps({"job": ex.job_id, "client": ex.client_id}), flush=True)
    import time; time.sleep(600)
"""


def test_a_dead_clients_results_do_not_outlive_its_grace(cluster):
    """A client killed with tasks running: the results they push for it go within the grace,
    not after a day."""
    cluster.start_worker(name="w0")
    proc = _client(_DYING_CLIENT, cluster.url, cluster.namespace,
                   MINIRAY_CLIENT_GRACE_SECONDS=4, MINIRAY_DIRECT_RESULTS=0)
    first = _line(proc)
    wait_for(lambda: _job(cluster, first["job"]).get(b"running") == b"1",
             what="the first task to start")
    proc.kill()
    proc.wait()
    res = Keys(cluster.namespace).results(first["client"])
    r = connect(cluster.url)
    try:
        wait_for(lambda: r.execute("EXISTS", res) == 1, what="a result pushed for the client")
        assert 0 < r.execute("TTL", res) <= 4
        wait_for(lambda: r.execute("EXISTS", res) == 0, timeout=30,
                 what="the dead client's results to go")
    finally:
        r.close()


# -- a paused server ---------------------------------------------------------------------------
def test_a_server_paused_for_forty_seconds_loses_nothing_and_reaps_nobody(tmp_path,
                                                                          monkeypatch):
    """SIGSTOP the server for 40 s (past the dead timeout and the old 30 s client key):
    on SIGCONT no worker is taken for dead, the job is not given up, every future settles
    with its result and the counters are exact."""
    with own_server(tmp_path, monkeypatch, "paused", workers=2) as srv, \
            miniray.Executor(redis_url=srv.url) as ex:
        wait_for(lambda: len(ex.workers()) == 2, what="two workers")
        ids = {w["id"] for w in ex.workers()}
        futures = [ex.submit(tasks.sleep_then, 1.0, i) for i in range(8)]
        wait_for(lambda: ex.progress()["running"] >= 2, what="both workers busy")
        _pause(srv.proc.pid, 40)
        assert [f.result(timeout=60) for f in futures] == list(range(8))
        kinds = {e.kind for e in ex.events()}
        assert not kinds & {"retried", "lost"}, kinds
        wait_for(lambda: ex.progress()["running"] == 0, what="nothing left running")
        p = ex.progress()
        assert (p["done"], p["failed"], p["queued"]) == (8, 0, 0), p
        assert {w["id"] for w in ex.workers()} == ids
        assert ex.submit(tasks.square, 6).result(timeout=30) == 36
        assert all(w.poll() is None for w in srv.workers), "a worker exited"


# -- shutdown ----------------------------------------------------------------------------------
_EXIT_CLIENT = """
    import json, os, signal, time, miniray, tasks
    ex = miniray.Executor()
    assert ex.submit(tasks.square, 3).result(timeout=60) == 9
    os.kill(int(os.environ["SERVER_PID"]), signal.SIGSTOP)
    futures = [ex.submit(tasks.square, i) for i in range(100)]
    print(json.dumps({"exiting": True}), flush=True)
"""


def test_a_script_whose_server_hangs_still_exits(tmp_path, monkeypatch):
    """At exit the executor cancels what is queued (shutdown(wait=False, cancel_futures=True)):
    a server that stopped answering (SIGSTOP) does not hold the interpreter's exit."""
    with own_server(tmp_path, monkeypatch, "exit") as srv:
        proc = _client(_EXIT_CLIENT, srv.url, "exit", SERVER_PID=srv.proc.pid)
        try:
            assert _line(proc) == {"exiting": True}
            try:
                assert proc.wait(60) == 0, proc.stderr.read()[-3000:]
            except subprocess.TimeoutExpired:
                pytest.fail("the script did not exit while its server hung")
        finally:
            proc.kill()
            os.kill(srv.proc.pid, signal.SIGCONT)

def test_shutdown_cancelling_a_burst_in_flight_returns_and_settles_everything(two_workers,
                                                                                tmp_path):
    """shutdown(wait=True, cancel_futures=True) right after a burst of submits (a flusher
    batch in flight): it returns, every future is cancelled or has run, and a task that ran
    is never reported cancelled."""
    for trial in range(10):
        runs = tmp_path / f"runs{trial}.txt"
        ex = two_workers.executor()
        futures = [ex.submit(tasks.record_run, str(runs), i) for i in range(3000)]
        t = threading.Thread(target=ex.shutdown, kwargs={"wait": True, "cancel_futures": True})
        t.start()
        t.join(60)
        assert not t.is_alive(), f"trial {trial}: shutdown hung"
        assert all(f.done() for f in futures), f"trial {trial}: futures left pending"
        ran = len(runs.read_text().splitlines()) if runs.exists() else 0
        finished = [f for f in futures if not f.cancelled()]
        assert [f.result() for f in finished] == [f.task_id for f in finished]
        assert ran == len(finished), (trial, ran, len(finished))


def test_map_after_shutdown_raises_and_a_racing_map_settles_what_it_made(two_workers):
    ex = two_workers.executor()
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.map(tasks.square, range(3))
    with pytest.raises(RuntimeError):
        ex.map_futures(tasks.square, range(3))

    ex = two_workers.executor()
    outcome = []

    def mapper():
        try:
            outcome.append(ex.map_futures(tasks.square, range(200_000)))
        except RuntimeError as e:
            outcome.append(e)

    t = threading.Thread(target=mapper)
    t.start()
    wait_for(lambda: ex._next_task > 1000, what="the map to be under way")
    ex.shutdown(wait=True, cancel_futures=True)
    t.join(60)
    assert not t.is_alive()
    assert outcome and isinstance(outcome[0], (RuntimeError, list)), outcome
    job = _job(two_workers, ex.job_id)
    assert (job[b"queued"], job[b"running"], job[b"state"]) == (b"0", b"0", b"done"), job
    made = int(job[b"done"]) + int(job[b"failed"]) + int(job[b"cancelled"])
    assert made > 0


# -- running() ---------------------------------------------------------------------------------
def test_running_turns_true_once_a_worker_has_the_task(cluster, tmp_path):
    cluster.start_worker(name="solo")
    with cluster.executor() as ex:
        held = ex.submit(tasks.gate, str(tmp_path), "a")
        behind = ex.submit(tasks.square, 5)
        items = ex.map_futures(functools.partial(tasks.gate, str(tmp_path)), ["b"])
        wait_for(held.running, timeout=20, what="the task a worker took to be running")
        assert (tmp_path / "started-a").exists()
        assert not behind.running() and not items[0].running()
        assert held.cancel() is False and held.running()
        assert behind.cancel() is True
        (tmp_path / "go").touch()
        assert held.result(timeout=30) == ""
        assert behind.cancelled()


# -- what a worker holds -------------------------------------------------------------------------
def test_a_slow_job_after_a_fast_one_is_shared_and_cancellable(cluster):
    """A task process sizes what it holds by each job's own timing: after thousands of fast
    tasks, a burst of slow ones is spread over every worker (not taken whole by the first
    that looks, on the fast job's figure), and what is still queued can be cancelled."""
    for i in range(3):
        cluster.start_worker(name=f"w{i}", wait=False)
    cluster.wait_workers(3)
    with cluster.executor() as ex:  # teaches each task process a fast job's timing
        assert sum(ex.map(tasks.square, range(3000), chunksize=1)) == sum(
            i * i for i in range(3000))
    ex = cluster.executor()
    futures = list(ex.map_futures(functools.partial(tasks.sleep_then, 1.5), range(9)))
    wait_for(lambda: sum(f.running() for f in futures) >= 3, what="three tasks running")
    ex.shutdown(wait=True, cancel_futures=True)
    ran = [f for f in futures if not f.cancelled()]
    assert len({f.worker for f in ran}) == 3, [f.worker for f in ran]
    assert len(ran) < 9, "nothing queued was left to cancel"
    assert [f.result() for f in ran] == [f.task_id for f in ran]


@pytest.mark.parametrize("signum", [signal.SIGKILL, signal.SIGTERM])
def test_a_worker_lost_while_shutdown_drops_the_queue_settles_its_running_task(
        cluster, monkeypatch, signum):
    """shutdown(wait=True, cancel_futures=True) waits for the running tasks; one whose worker
    dies (reaped) or leaves (hands it back) then cannot run again, since the job's queue and
    payloads are gone: it fails with WorkerLostError. It hung, and shutdown with it."""
    monkeypatch.setenv("MINIRAY_WORKER_DEAD_SECONDS", "2")
    cluster.env_extra["MINIRAY_WORKER_DEAD_SECONDS"] = "2"
    victim = cluster.start_worker(name="victim")
    ex = cluster.executor()
    f = ex.submit(tasks.sleep_then, 60, 1)
    wait_for(f.running, 30)
    cluster.start_worker(name="other")  # a live worker reaps the dead one
    returned = threading.Event()
    threading.Thread(target=lambda: (ex.shutdown(wait=True, cancel_futures=True),
                                     returned.set()), daemon=True).start()
    r = connect(cluster.url)
    state = lambda: r.execute("HGET", Keys(cluster.namespace).job(ex.job_id), "state")  # noqa: E731
    wait_for(lambda: state() == b"closing", 30)
    os.kill(victim.pid, signum)
    assert returned.wait(60), "shutdown(wait=True) never returned"
    with pytest.raises(miniray.WorkerLostError, match="cancel_futures"):
        f.result(timeout=0)
    r.close()
