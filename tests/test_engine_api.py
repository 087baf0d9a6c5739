"""The engine's own promises beyond the futures contract: function cache, per-item map errors,
the embedded local cluster, job cancellation, out-of-band buffers, configuration errors."""

import concurrent.futures as cf
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest

import miniray
import tasks
from miniray.keys import Keys
from miniray.resp import Connection
from support import ROOT, TESTS

pytestmark = pytest.mark.timeout(60)


def _redis(cluster, request=None):
    conn = Connection(cluster.url)
    _OPEN.append(conn)
    return conn


_OPEN: list = []


@pytest.fixture(autouse=True)
def _close_connections():
    yield
    while _OPEN:
        _OPEN.pop().close()


def test_function_is_stored_once_by_hash_with_a_ttl(cluster):
    cluster.start_worker()
    with cluster.executor() as ex:
        assert [f.result(timeout=30) for f in [ex.submit(tasks.square, i) for i in range(50)]] \
            == [i * i for i in range(50)]
        # two function objects with the same code and closure are one function: one key
        for fn in [(lambda: 1) for _ in range(2)]:
            assert ex.submit(fn).result(timeout=30) == 1
        r = _redis(cluster)
        fn_keys = r.execute("KEYS", Keys(cluster.namespace).fn("*"))
        assert len(fn_keys) == 2
        for key in fn_keys:
            assert 0 < r.execute("TTL", key) <= 86400


def test_map_error_in_a_chunk_spares_the_other_items(cluster):
    cluster.start_worker()
    with cluster.executor() as ex:
        futures_before = ex.progress()
        it = ex.map(tasks.raise_value_error, range(6), chunksize=6)
        assert [next(it) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad item 3"):
            next(it)
        deadline = time.monotonic() + 10
        while ex.progress()["done"] + ex.progress()["failed"] < 6:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        p = ex.progress()
        assert (p["done"], p["failed"]) == (futures_before["done"] + 5, 1)


def test_initializer_globals_reach_tasks_sent_by_value(cluster, tmp_path, monkeypatch):
    """A notebook's (or a script's own module's) functions travel by value, each with a copy
    of the globals it uses. What the initializer sets as a global must still be what the
    tasks see, as with ProcessPoolExecutor: the standard way to load a model once per
    process."""
    (tmp_path / "nb_cells.py").write_text(
        "model = None\n"
        "def load(name):\n"
        "    global model\n"
        "    model = {'name': name}\n"
        "def _name():\n"
        "    return model['name']\n"
        "def predict(x):\n"
        "    return (_name(), x)\n"
        "def loaded():\n"
        "    return model is not None\n")
    monkeypatch.syspath_prepend(str(tmp_path))  # not on the worker's path: sent by value
    import nb_cells

    cluster.start_worker()
    with cluster.executor(initializer=nb_cells.load, initargs=("resnet",)) as ex:
        assert list(ex.map(nb_cells.predict, range(3), timeout=30)) == \
            [("resnet", 0), ("resnet", 1), ("resnet", 2)]
        assert ex.submit(nb_cells.loaded).result(timeout=30) is True
    with cluster.executor() as ex:  # another job, no initializer: nothing leaks into it
        assert ex.submit(nb_cells.loaded).result(timeout=30) is False


def test_executor_cancel_interrupts_running_and_drops_queued(cluster, tmp_path):
    cluster.start_worker()
    ex = cluster.executor()
    started = tmp_path / "started"
    running = ex.submit(tasks.record_run, str(started), "r", 30.0)
    deadline = time.monotonic() + 20
    while not started.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    queued = [ex.submit(tasks.square, i) for i in range(5)]
    ex.cancel()
    done, not_done = cf.wait([running, *queued], timeout=20)
    assert not not_done
    assert all(f.cancelled() for f in queued)
    assert running.cancelled()
    assert ex.progress()["state"] == "cancelled"
    # the worker is free again: a new job runs at once
    with cluster.executor() as ex2:
        assert ex2.submit(tasks.square, 7).result(timeout=20) == 49
    ex.shutdown()


def test_large_arrays_travel_out_of_band_and_arrive_intact(cluster):
    from miniray.serialization import dumps

    a = np.arange(2_000_000, dtype=np.float64)
    frames = dumps(("s", (a,), {}))
    assert len(frames) == 2 and frames[1].nbytes == a.nbytes  # the buffer is not in the pickle
    assert len(frames[0]) < 1000
    cluster.start_worker()
    with cluster.executor() as ex:
        assert ex.submit(tasks.array_sum, a).result(timeout=30) == float(a.sum())


def test_a_dropped_future_frees_its_result_at_once(cluster):
    """No reference cycle holds a finished future: its result (a big array, say) goes with
    the last reference, not at some later garbage collection. Waited on both ways."""
    import gc
    import weakref

    cluster.start_worker()
    with cluster.executor() as ex:
        gc.disable()
        try:
            for wait in (lambda f: f.result(timeout=30), lambda f: cf.wait([f], timeout=30)):
                f = ex.submit(tasks.make_array, 1000)
                wait(f)
                ref = weakref.ref(f.result())
                del f
                assert ref() is None, "a finished future outlived its last reference"
        finally:
            gc.enable()


def test_job_keys_are_cleaned_up_after_shutdown(cluster):
    cluster.start_worker()
    ex = cluster.executor()
    assert ex.submit(tasks.square, 3).result(timeout=30) == 9
    job, client = ex.job_id, ex.client_id
    ex.shutdown()
    r, k = _redis(cluster), Keys(cluster.namespace)
    assert not r.execute("EXISTS", k.queue(job), k.tasks(job), k.client(client),
                         k.results(client))
    assert 0 < r.execute("TTL", k.job(job))
    assert r.execute("HGET", k.job(job), "state") == b"done"


def test_bad_settings_and_limits_say_what_and_how_to_fix(monkeypatch):
    monkeypatch.setenv("MINIRAY_HEARTBEAT_SECONDS", "soon")
    with pytest.raises(miniray.ConfigurationError, match="MINIRAY_HEARTBEAT_SECONDS"):
        miniray.Executor(redis_url="redis://127.0.0.1:1")
    monkeypatch.delenv("MINIRAY_HEARTBEAT_SECONDS")
    with pytest.raises(miniray.ConfigurationError, match="timeout_seconds"):
        miniray.Limits(timeout_seconds=-1)
    with pytest.raises(miniray.ConfigurationError, match="gpus"):
        miniray.Limits(gpus=1.5)
    with pytest.raises(miniray.ConfigurationError, match="gpu_memory_gb"):
        miniray.Limits(gpu_memory_gb=0)
    with pytest.raises(miniray.ConfigurationError, match="triton"):
        miniray.Limits(triton="yes")
    assert miniray.Limits(gpu_memory_gb=4).gpus == 1  # packing implies a GPU
    assert miniray.Limits(gpus=2, gpu_memory_gb=4).gpus == 2
    with pytest.raises(miniray.ServerError, match="cannot reach"):
        miniray.Executor(redis_url="redis://:pw@127.0.0.1:1")


def test_public_surface_matches_all():
    import types

    for name in miniray.__all__:
        assert getattr(miniray, name) is not None, name
    public = {n for n, v in vars(miniray).items()
              if not n.startswith("_") and not isinstance(v, types.ModuleType)}
    assert public <= set(miniray.__all__)
    with pytest.raises(AttributeError):
        miniray.NoSuchThing


def _run_script(code, env_extra=None, timeout=60):
    env = {k: v for k, v in os.environ.items()
           if k not in ("MINIRAY_REDIS_URL", "MINIRAY_NAMESPACE")}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT])
    env.update(env_extra or {})
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                          text=True, timeout=timeout)


def test_no_address_starts_a_private_local_cluster():
    """The issue's first command, in a fresh process with nothing running."""
    code = (
        "import miniray; ex = miniray.Executor(); "
        "print(sum(ex.map(lambda x: x*x, range(10000), chunksize=100)))"
    )
    out = _run_script(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "333283335000"


def test_local_cluster_is_private_and_sized_by_the_environment():
    code = """
import json, time, miniray, psutil
ex = miniray.Executor()
assert ex.submit(abs, -1).result(timeout=30) == 1
deadline = time.monotonic() + 20
while len(ex.workers()) < 3 and time.monotonic() < deadline:
    time.sleep(0.05)
c = miniray.cluster.local._cluster
srv = psutil.Process(c.server.proc.pid)
procs = [srv] + srv.children(recursive=True)
listening = [conn.laddr for p in procs for conn in p.net_connections(kind="inet")
             if conn.status == psutil.CONN_LISTEN]
print(json.dumps({"workers": len(ex.workers()), "tcp": [list(a) for a in listening],
                  "url": c.url.split("?")[0], "password": "password=" in c.url}))
"""
    out = _run_script(code, {"MINIRAY_LOCAL_WORKERS": "3"})
    assert out.returncode == 0, out.stderr
    import json

    info = json.loads(out.stdout.strip().splitlines()[-1])
    assert info["workers"] == 3
    assert info["tcp"] == [], "the embedded server listens on a unix socket only"
    assert info["url"].startswith("unix://") and info["password"]


def test_local_cluster_dies_with_its_process_even_on_sigkill():
    """... and the next miniray process sweeps away the directories it left (server socket,
    config and logs, the executor's inbox), as after a notebook kernel restart."""
    code = """
import os, sys, time, miniray
ex = miniray.Executor()
assert ex.submit(abs, -1).result(timeout=30) == 1
c = miniray.cluster.local._cluster
print(" ".join(str(p) for p in [c.server.proc.pid, *c.worker_pids()]), flush=True)
print(c.server.dir, os.path.dirname(ex._inbox.path), flush=True)
time.sleep(60)
"""
    env = {k: v for k, v in os.environ.items() if k not in ("MINIRAY_REDIS_URL",)}
    p = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                         text=True)
    pids = [int(x) for x in p.stdout.readline().split()]
    dirs = p.stdout.readline().split()
    assert len(pids) >= 2 and len(dirs) == 2 and all(os.path.isdir(d) for d in dirs)
    p.kill()
    p.wait()
    p.stdout.close()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        alive = [pid for pid in pids if psutil.pid_exists(pid)
                 and psutil.Process(pid).status() != psutil.STATUS_ZOMBIE]
        if not alive:
            break
        time.sleep(0.1)
    else:
        raise AssertionError(f"still running after the owner was killed: {alive}")
    assert all(os.path.isdir(d) for d in dirs)  # a killed process cannot clean up
    out = _run_script("import miniray; print(miniray.Executor().submit(abs, -2).result())")
    assert out.returncode == 0 and out.stdout.strip() == "2", out.stderr
    assert not any(os.path.exists(d) for d in dirs), dirs


def test_local_cluster_started_from_a_short_lived_thread_outlives_it():
    code = """
import threading, time, miniray
box = []
t = threading.Thread(target=lambda: box.append(miniray.Executor()))
t.start(); t.join()
time.sleep(1.0)  # a parent-death signal tied to that thread would have fired by now
print(box[0].submit(abs, -5).result(timeout=20))
"""
    out = _run_script(code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "5"
