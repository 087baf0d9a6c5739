"""A worker survives poison jobs: what it finds in Redis for a job cannot crash it.

Real server, real worker processes, real signals; the data in Redis is damaged by hand, as an
older client, a person with redis-cli or a corrupted store would leave it.
"""

import functools
import json
import pickle
import time

import pytest

import tasks
from miniray.broker import connect
from miniray.errors import MinirayError, SerializationError
from miniray.keys import Keys
from miniray.protocol import encode_chunk_head
from miniray.serialization import dumps_function
from support import wait_for

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
def solo(cluster):
    cluster.start_worker(name="solo")
    return cluster


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
], ids=["not-json", "not-utf8", "list", "timeout-str", "cpus-negative", "env-list", "memory"])
def test_a_malformed_spec_fails_its_job_and_the_worker_goes_on(solo, spec, what):
    worker_id = solo.workers()[0]["id"]
    r = connect(solo.url)
    with solo.executor() as ex:
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
    _alive_and_serving(solo, worker_id)


def test_a_malformed_spec_fails_chunks_the_worker_sends_itself(solo, tmp_path):
    """A process with limits hands chunks of a job without them to its worker, which starts a
    process for them: the worker reads the spec too, and fails them."""
    import miniray

    worker_id = solo.workers()[0]["id"]
    r = connect(solo.url)
    with solo.executor() as ex:
        gate = _Gate(solo, tmp_path, limits=miniray.Limits(memory_gb=1))
        futures = ex.map_futures(tasks.square, range(4), chunksize=2)
        _queued(r, ex, 2)
        r.execute("HSET", ex.keys.job(ex.job_id), "spec", b'{"memory_bytes": true}')
        gate.open()
        for f in futures:
            exc = f.exception(timeout=30)
            assert isinstance(exc, MinirayError) and "'memory_bytes'" in str(exc), exc
    r.close()
    _alive_and_serving(solo, worker_id)


def test_a_spec_field_from_a_newer_client_is_ignored(solo):
    r = connect(solo.url)
    with solo.executor() as ex:
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
def test_a_malformed_payload_fails_its_chunk_and_the_worker_goes_on(solo, tmp_path, kind):
    worker_id = solo.workers()[0]["id"]
    sha = dumps_function(tasks.square)[0]
    r = connect(solo.url)
    with solo.executor() as ex:
        gate = _Gate(solo, tmp_path)
        futures = ex.map_futures(tasks.square, range(4), chunksize=2)
        futures.append(ex.submit(tasks.square, 5))
        def head(n):
            return encode_chunk_head(sha, 0, n)

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
    _alive_and_serving(solo, worker_id)


def test_a_malformed_function_fails_its_tasks_and_the_worker_goes_on(solo, tmp_path):
    worker_id = solo.workers()[0]["id"]
    fn = functools.partial(tasks.add, 1000, c=int(time.time()))  # one no process has seen
    sha = dumps_function(fn)[0]
    r = connect(solo.url)
    with solo.executor() as ex:
        gate = _Gate(solo, tmp_path)
        futures = [ex.submit(fn, 1), *ex.map_futures(fn, range(3), chunksize=2)]
        _queued(r, ex, 3)
        r.execute("SET", ex.keys.fn(sha), b"\x80\x05garbage")
        gate.open()
        for f in futures:
            exc = f.exception(timeout=30)
            assert isinstance(exc, SerializationError), exc
            assert "function" in str(exc) and "another miniray version" in str(exc), exc
    r.close()
    _alive_and_serving(solo, worker_id)
