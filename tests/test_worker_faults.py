"""A worker survives what it can: poison jobs, signal storms, a lost or paused server.

Real server, real worker processes, real signals; the data in Redis is damaged by hand, as an
older client, a person with redis-cli or a corrupted store would leave it.
"""

import functools
import json
import os
import pickle
import signal
import subprocess
import sys
import time

import psutil
import pytest

import tasks
from miniray.broker import connect
from miniray.errors import MinirayError, SerializationError
from miniray.keys import Keys
from miniray.protocol import encode_chunk
from miniray.serialization import dumps_function
from support import wait_for, worker_env

pytestmark = pytest.mark.timeout(120)


def _alive_and_serving(cluster, worker_id):
    """The worker did not die or restart, and it runs another executor's job."""
    assert cluster.procs[0].poll() is None, cluster.procs[0].log_path.read_text()[-3000:]
    assert [w["id"] for w in cluster.workers()] == [worker_id]
    with cluster.executor() as ex:
        assert ex.submit(tasks.square, 6).result(timeout=30) == 36


class _Gate:
    """A task that holds the worker's only slot until opened: work submitted meanwhile waits
    in the queue, where the test can damage it before the worker claims it."""

    def __init__(self, cluster, tmp_path, **executor):
        self.dir, self.ex = tmp_path, cluster.executor(**executor)
        self.future = self.ex.submit(tasks.gate, str(tmp_path), "g")
        wait_for(lambda: (tmp_path / "started-g").exists(), what="the gate task to start")

    def open(self):
        (self.dir / "go").write_text("")
        self.future.result(timeout=30)
        self.ex.shutdown()


# -- poison jobs: a malformed spec -------------------------------------------------------------
@pytest.mark.parametrize("spec, what", [
    (b"{not json", "not JSON"),
    (b"\xff\xfe", "not JSON"),
    (b"[1, 2]", "a JSON list"),
    (json.dumps({"timeout": "abc"}).encode(), "'timeout'"),
    (json.dumps({"cpus": -1}).encode(), "'cpus'"),
    (json.dumps({"env": [1]}).encode(), "'env'"),
    (json.dumps({"memory_bytes": "lots"}).encode(), "'memory_bytes'"),
    (json.dumps({"keep_children": "yes"}).encode(), "'keep_children'"),
], ids=["not-json", "not-utf8", "list", "timeout-str", "cpus-negative", "env-list", "memory",
        "keep-children-str"])
def test_a_malformed_spec_fails_its_job_and_the_worker_goes_on(one_worker, spec, what):
    worker_id = one_worker.workers()[0]["id"]
    r = connect(one_worker.url)
    with one_worker.executor() as ex:
        r.execute("HSET", ex.keys.job(ex.job_id), "spec", spec)
        lone = ex.submit(tasks.square, 3)  # handed to the idle slot whole
        many = ex.map_futures(tasks.square, range(5), chunksize=2)  # claimed
        for f in [lone, *many]:
            exc = f.exception(timeout=30)
            assert isinstance(exc, MinirayError), exc
            assert "malformed" in str(exc) and what in str(exc), exc
            assert "another miniray version" in str(exc)
        assert ex.progress()["failed"] == 6
    r.close()
    _alive_and_serving(one_worker, worker_id)


def test_a_malformed_spec_fails_chunks_the_worker_sends_itself(one_worker, tmp_path):
    """A process with limits hands chunks of a job without them to its worker, which starts a
    process for them: the worker reads the spec too, and fails them."""
    import miniray

    worker_id = one_worker.workers()[0]["id"]
    r = connect(one_worker.url)
    with one_worker.executor() as ex:
        gate = _Gate(one_worker, tmp_path, limits=miniray.Limits(memory_gb=1))
        futures = ex.map_futures(tasks.square, range(4), chunksize=2)
        _queued(r, ex, 2)
        r.execute("HSET", ex.keys.job(ex.job_id), "spec", b'{"memory_bytes": true}')
        gate.open()
        for f in futures:
            exc = f.exception(timeout=30)
            assert isinstance(exc, MinirayError) and "'memory_bytes'" in str(exc), exc
    r.close()
    _alive_and_serving(one_worker, worker_id)


def test_a_spec_field_from_a_newer_client_is_ignored(one_worker):
    r = connect(one_worker.url)
    with one_worker.executor() as ex:
        key = ex.keys.job(ex.job_id)
        spec = json.loads(r.execute("HGET", key, "spec"))
        spec["priority_class"] = {"from": "the future"}
        r.execute("HSET", key, "spec", json.dumps(spec))
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9
        assert list(ex.map(tasks.square, range(5), chunksize=2, timeout=30)) == [0, 1, 4, 9, 16]
    r.close()


# -- poison jobs: a malformed payload or function -----------------------------------------------
def _queued(r, ex, n):
    """Wait until ``n`` chunks wait in the job's queue (submits are sent in the background)."""
    wait_for(lambda: r.execute("LLEN", ex.keys.queue(ex.job_id)) >= n, what=f"{n} chunks queued")


def _garble_payload(r, ex, frame0, n):
    """Replace frame 0 of each of the ``n`` queued chunks with ``frame0(its item count)``."""
    _queued(r, ex, n)
    entries = [Keys.parse_entry(e.decode())
               for e in r.execute("LRANGE", ex.keys.queue(ex.job_id), 0, -1)]
    for chunk, _, items in entries:
        r.execute("HSET", ex.keys.tasks(ex.job_id), Keys.payload_field(chunk, 0), frame0(items))


@pytest.mark.parametrize("kind", ["short", "version", "count", "pickle", "shape"])
def test_a_malformed_payload_fails_its_chunk_and_the_worker_goes_on(one_worker, tmp_path, kind):
    worker_id = one_worker.workers()[0]["id"]
    sha = dumps_function(tasks.square)[0]
    r = connect(one_worker.url)
    with one_worker.executor() as ex:
        gate = _Gate(one_worker, tmp_path)
        futures = ex.map_futures(tasks.square, range(4), chunksize=2)
        futures.append(ex.submit(tasks.square, 5))
        def head(n):
            return encode_chunk(sha, 0, n, [b""])[0]  # the head alone

        frame0 = {"short": lambda n: b"junk",
                  "version": lambda n: b"\x63" + head(n)[1:] + pickle.dumps(("m1", [1] * n)),
                  "count": lambda n: head(n + 1) + pickle.dumps(("m1", [1] * (n + 1))),
                  "pickle": lambda n: head(n) + b"not a pickle",
                  "shape": lambda n: head(n) + pickle.dumps(("m1", 7))}[kind]
        _garble_payload(r, ex, frame0, 3)
        gate.open()
        for f in futures:
            exc = f.exception(timeout=30)
            assert isinstance(exc, MinirayError), exc
            if kind == "pickle":
                assert isinstance(exc, SerializationError), exc
            text = str(exc)
            assert ("protocol" in text) if kind == "version" else ("another miniray version"
                                                                   in text), text
        assert ex.progress()["failed"] == 5
    r.close()
    _alive_and_serving(one_worker, worker_id)


def test_a_malformed_function_fails_its_tasks_and_the_worker_goes_on(one_worker, tmp_path):
    worker_id = one_worker.workers()[0]["id"]
    fn = functools.partial(tasks.add, 1000, c=int(time.time()))  # one no process has seen
    sha = dumps_function(fn)[0]
    r = connect(one_worker.url)
    with one_worker.executor() as ex:
        gate = _Gate(one_worker, tmp_path)
        futures = [ex.submit(fn, 1), *ex.map_futures(fn, range(3), chunksize=2)]
        _queued(r, ex, 3)
        r.execute("SET", ex.keys.fn(sha), b"\x80\x05garbage")
        gate.open()
        for f in futures:
            exc = f.exception(timeout=30)
            assert isinstance(exc, SerializationError), exc
            assert "function" in str(exc) and "another miniray version" in str(exc), exc
    r.close()
    _alive_and_serving(one_worker, worker_id)


# -- clean deaths ------------------------------------------------------------------------------
def _gone(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def _first_run(runs):
    wait_for(lambda: runs.exists() and runs.read_text().strip(), what="the task to start")
    return int(runs.read_text().split()[0])


@pytest.mark.parametrize("signals", [2, 300], ids=["twice", "storm"])
def test_sigterms_during_a_task_end_the_worker_which_hands_the_task_back(cluster, tmp_path,
                                                                          signals):
    """The handler only notes the signal: a second one while the first is handled (or a
    storm of them) cannot deadlock the worker."""
    victim = cluster.start_worker(name="victim")
    runs = tmp_path / "runs"
    with cluster.executor() as ex:
        f = ex.submit(tasks.record_pid_then_sleep, str(runs), 2.0, "ran")
        task = _first_run(runs)
        for _ in range(signals):
            try:
                os.kill(victim.pid, signal.SIGTERM)
            except ProcessLookupError:
                break
        try:
            code = victim.wait(timeout=60)
        except subprocess.TimeoutExpired:
            victim.kill()
            pytest.fail(f"the worker hung after {signals} SIGTERMs: "
                        + victim.log_path.read_text()[-2000:])
        assert code == 0, victim.log_path.read_text()[-2000:]
        wait_for(lambda: _gone(task), what=f"task process {task} to be gone")
        cluster.start_worker(name="heir")
        assert f.result(timeout=60) == "ran"  # handed back, and run again elsewhere
    assert len(runs.read_text().split()) == 2


def test_a_worker_whose_parent_is_killed_exits(cluster, tmp_path):
    script = ("import os, subprocess, sys, time\n"
              "p = subprocess.Popen([sys.executable, '-m', 'miniray.worker', '--name', 'orphan',"
              " '--parent-pid', str(os.getpid())])\n"
              "print(p.pid, flush=True)\n"
              "time.sleep(300)\n")
    with open(tmp_path / "orphan.log", "ab") as log:
        parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                                  stderr=log, env=worker_env(cluster.url, cluster.namespace))
    try:
        worker = int(parent.stdout.readline())
        cluster.wait_workers(1)
        runs = tmp_path / "runs"
        ex = cluster.executor()
        ex.submit(tasks.record_pid_then_sleep, str(runs), 60)
        task = _first_run(runs)
        parent.kill()
        parent.wait()
        wait_for(lambda: _gone(worker) and _gone(task), timeout=60,
                 what="the orphaned worker and its task process to exit")
        ex.shutdown(wait=False, cancel_futures=True)  # (no worker is left to run it)
    finally:
        parent.kill()
        parent.wait()
        parent.stdout.close()


# -- a lost, restarted or paused server --------------------------------------------------------
class _OwnServer:
    """A server of the test's own (it kills, restarts or pauses it) and one worker on it."""

    def __init__(self, tmp_path, monkeypatch, env=None):
        from miniray.cluster.server import ServerProcess

        self.srv = ServerProcess(tcp=True)
        self.ns = "own"
        monkeypatch.setenv("MINIRAY_NAMESPACE", self.ns)
        self.log_path = tmp_path / "worker.log"
        with open(self.log_path, "ab") as log:
            self.worker = subprocess.Popen(
                [sys.executable, "-m", "miniray.worker", "--name", "survivor"],
                env=worker_env(self.srv.url, self.ns, env), stdout=log, stderr=log)

    def log(self):
        return self.log_path.read_text()[-3000:]

    def close(self):
        self.srv.close()
        if self.worker.poll() is None:
            self.worker.terminate()
            try:
                self.worker.wait(30)
            except subprocess.TimeoutExpired:
                self.worker.kill()
                self.worker.wait()


@pytest.fixture
def own(tmp_path, monkeypatch):
    made = []

    def make(env=None):
        made.append(_OwnServer(tmp_path, monkeypatch, env))
        return made[-1]

    yield make
    for o in made:
        o.close()


def _wait_registered(o):
    from miniray.client import observe
    from miniray.keys import Keys as K

    def registered():
        r = connect(o.srv.url)
        try:
            return len(observe.list_workers(r, K(o.ns))) == 1
        finally:
            r.close()

    wait_for(registered, timeout=30, what="the worker to register")


def test_a_server_down_for_a_while_gets_the_same_worker_back(own):
    """Down longer than a heartbeat or two (workers used to give up after 5 s), then back on
    the same port: the worker reconnects, with backoff, and serves a new executor."""
    import miniray

    o = own()
    _wait_registered(o)
    from miniray.cluster.server import ServerProcess

    port, password = o.srv.port, o.srv.password
    o.srv.close()
    time.sleep(12)  # the outage (no assertion is timed)
    o.srv = ServerProcess(port=port, password=password)
    with miniray.Executor(redis_url=o.srv.url) as ex:
        assert ex.submit(tasks.square, 5).result(timeout=60) == 25
        assert list(ex.map(tasks.square, range(4), timeout=60)) == [0, 1, 4, 9]
    assert o.worker.poll() is None, o.log()
    _wait_registered(o)


def test_a_server_gone_for_good_makes_the_worker_exit_non_zero(own, tmp_path):
    """After MINIRAY_SERVER_GONE_SECONDS the worker gives up: it exits non-zero (a supervisor
    restarts it), says why on stderr, and leaves no task process behind."""
    import miniray

    o = own({"MINIRAY_SERVER_GONE_SECONDS": "3"})
    _wait_registered(o)
    runs = tmp_path / "runs"
    ex = miniray.Executor(redis_url=o.srv.url)
    ex.submit(tasks.record_pid_then_sleep, str(runs), 120)
    task = _first_run(runs)
    o.srv.proc.kill()
    o.srv.proc.wait()
    try:
        code = o.worker.wait(timeout=90)
    except subprocess.TimeoutExpired:
        pytest.fail("the worker did not give up on a server gone for good: " + o.log())
    assert code not in (0, None), o.log()
    assert "MINIRAY_SERVER_GONE_SECONDS" in o.log()
    wait_for(lambda: _gone(task), what=f"task process {task} to be gone")
    ex.shutdown(wait=False, cancel_futures=True)


def test_sigterm_ends_a_worker_whose_server_hangs(own, tmp_path):
    """A server that stops answering (SIGSTOP) holds every Redis call; the worker's main
    thread makes none, so SIGTERM still ends the worker and its task process."""
    import miniray

    o = own()
    _wait_registered(o)
    runs = tmp_path / "runs"
    ex = miniray.Executor(redis_url=o.srv.url)
    ex.submit(tasks.record_pid_then_sleep, str(runs), 120)
    task = _first_run(runs)
    os.kill(o.srv.proc.pid, signal.SIGSTOP)
    try:
        time.sleep(3)  # a heartbeat or two go out and wait for the server
        o.worker.send_signal(signal.SIGTERM)
        o.worker.send_signal(signal.SIGTERM)
        try:
            o.worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pytest.fail("SIGTERM did not end a worker whose server hangs: " + o.log())
        wait_for(lambda: _gone(task), what=f"task process {task} to be gone")
    finally:
        os.kill(o.srv.proc.pid, signal.SIGCONT)
    ex.shutdown(wait=False, cancel_futures=True)
