"""Large values through shared memory between a client and task processes on its machine
(``miniray.values.shm``): they arrive intact and without passing through the server, the files are
freed as soon as their receiver has them, and nothing is left in /dev/shm when either side
is SIGKILLed (the worker, a task process or the next executor sweeps)."""

import glob
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import shm_tasks
from miniray.values import shm
from miniray.errors import TaskCrashedError
from support import ROOT, TESTS, wait_for

pytestmark = pytest.mark.skipif(not shm.available(), reason="no writable /dev/shm")

MB50 = 50 * 1024 * 1024


def _big():
    return np.arange(MB50 // 8, dtype=np.float64)


def _files(path):
    return os.listdir(path) if os.path.isdir(path) else []


def _dirs_of(pid):
    return glob.glob(os.path.join(shm.ROOT, f"miniray-shm-*-{pid}-*"))


def _server_input(ex):
    """Bytes the server has received from all its clients so far."""
    info = ex._r.execute("INFO", "stats").decode()
    return int(info.split("total_net_input_bytes:")[1].split()[0])


@pytest.fixture
def every_worker_here(cluster, monkeypatch):
    """The test cluster's workers are on this machine: arguments may go through /dev/shm."""
    monkeypatch.setenv("MINIRAY_SHM", "2")
    return cluster


def test_a_50mb_argument_and_result_go_through_shared_memory_and_are_freed(every_worker_here):
    cluster = every_worker_here
    cluster.start_worker(name="solo")
    a = _big()
    before = dict(shm.stats)
    with cluster.executor() as ex:
        sent = _server_input(ex)
        doubled, total, mapped = ex.submit(shm_tasks.double, a).result(timeout=60)
        assert _server_input(ex) - sent < 1 << 20  # neither value went through the server
        assert total == float(a.sum()) and np.array_equal(doubled, a * 2)
        assert mapped >= a.nbytes  # the task process mapped the argument
        assert shm.stats["placed"] - before["placed"] >= a.nbytes  # the client wrote it once
        assert shm.stats["attached"] - before["attached"] >= a.nbytes  # and mapped the result
        where = ex._shm.dir
        # the result's file was unlinked when it was mapped; the argument's is kept for the
        # next argument a while (see the next test), then unlinked
        wait_for(lambda: _files(where) == [], timeout=shm.POOL_IDLE + 10,
                 what="the files to go")
    assert not os.path.exists(where)  # the executor's directory goes with it
    # the value the user holds stays valid after every file is gone (and is writable)
    assert float(doubled.sum()) == 2 * total
    doubled[0] = 7.0
    assert doubled[0] == 7.0


def test_an_argument_file_is_written_again_unless_a_task_still_maps_it(every_worker_here):
    """A freed argument's file is written again for the next argument (no fresh tmpfs pages
    to zero), but never while a task process still maps it: a task that kept its argument
    sees it unchanged."""
    cluster = every_worker_here
    cluster.start_worker(name="solo")  # one task process runs everything below
    ones, twos = np.ones(1 << 18), np.full(1 << 18, 2.0)  # 2 MB each
    with cluster.executor() as ex:
        assert ex.submit(shm_tasks.keep, ones).result(timeout=60) == ones.sum()
        reused = shm.stats["reused"]
        doubled, _, mapped = ex.submit(shm_tasks.double, twos).result(timeout=60)
        assert np.array_equal(doubled, twos * 2) and mapped >= 2 * ones.nbytes
        assert shm.stats["reused"] == reused  # the kept argument's file was not written again
        assert ex.submit(shm_tasks.kept_sums).result(timeout=60) == [ones.sum()]
        # double's argument was dropped by its task: its file is written again, exactly
        for value in (3.0, 4.0):
            arg = np.full(1 << 18, value)
            doubled, _, _ = ex.submit(shm_tasks.double, arg).result(timeout=60)
            assert np.array_equal(doubled, arg * 2)
        assert shm.stats["reused"] >= reused + 2
        assert 1 <= len(_files(ex._shm.dir)) <= shm.POOL_FILES
        # kept files nobody writes again are unlinked after a while
        wait_for(lambda: _files(ex._shm.dir) == [], timeout=shm.POOL_IDLE + 10,
                 what="the kept files to go")


def test_map_results_through_shared_memory_leave_nothing(cluster):
    """Results take shared memory on any server (the client is on this machine)."""
    cluster.start_worker(name="solo")
    before = shm.stats["attached"]
    with cluster.executor() as ex:
        got = list(ex.map(np.ones, [1 << 20] * 6))  # 8 MB each
        assert all(x.shape == (1 << 20,) and x.sum() == 1 << 20 for x in got)
        assert shm.stats["attached"] - before >= 6 * (8 << 20)
        wait_for(lambda: _files(ex._shm.dir) == [], timeout=10, what="the files to go")


def test_the_switch_off_takes_the_old_path(cluster, monkeypatch):
    monkeypatch.setenv("MINIRAY_SHM", "0")
    cluster.start_worker(name="solo")
    a = _big()
    before = dict(shm.stats)
    with cluster.executor() as ex:
        assert ex._shm is None
        doubled, total, mapped = ex.submit(shm_tasks.double, a).result(timeout=60)
        assert total == float(a.sum()) and np.array_equal(doubled, a * 2)
        assert mapped == 0
    assert shm.stats == before


def test_a_killed_task_process_leaves_nothing(every_worker_here, tmp_path):
    """SIGKILL of a task process that holds the argument's mapping and a half-written result:
    the task fails (TaskCrashedError); its worker removes the dead process's directory when
    it reaps it, and the argument's file goes when the chunk has its outcome."""
    cluster = every_worker_here
    cluster.start_worker(name="solo")
    a = _big()
    marker = str(tmp_path / "pid")
    with cluster.executor() as ex:
        fut = ex.submit(shm_tasks.die_once_holding, a, marker)
        wait_for(lambda: os.path.exists(marker), timeout=30, what="the task to start")
        pid = int(open(marker).read())
        assert _dirs_of(pid) and len(_files(ex._shm.dir)) == 1  # it holds both
        os.kill(pid, signal.SIGKILL)
        assert isinstance(fut.exception(timeout=60), TaskCrashedError)
        wait_for(lambda: not _dirs_of(pid), timeout=20, what="the dead task's directory to go")
        wait_for(lambda: _files(ex._shm.dir) == [], timeout=10, what="the files to go")
        # the replacement process maps the argument of a new submit as ever
        assert ex.submit(shm_tasks.die_once_holding, a, marker).result(timeout=60) == a.sum()
        wait_for(lambda: _files(ex._shm.dir) == [], timeout=10, what="the files to go")


_CLIENT = textwrap.dedent("""
    import sys, time
    import numpy as np
    import miniray, shm_tasks
    ex = miniray.Executor()
    ex.submit(shm_tasks.sum_after, np.ones(4 << 20), float(sys.argv[1]), sys.argv[2])
    print(ex._shm.dir, flush=True)
    time.sleep(120)
""")


def _client(cluster, tmp_path, seconds):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
    marker = str(tmp_path / "started")
    p = subprocess.Popen([sys.executable, "-c", _CLIENT, str(seconds), marker], env=env,
                         stdout=subprocess.PIPE, text=True)
    where = p.stdout.readline().strip()
    assert where.startswith(shm.ROOT), where
    return p, where, marker


def test_a_killed_clients_files_are_swept_by_the_task_that_read_them(every_worker_here,
                                                                     tmp_path):
    """The client dies while its task runs: the task process sweeps the dead client's
    directory when that chunk ends (no executor needs to start)."""
    cluster = every_worker_here
    cluster.start_worker(name="solo")
    p, where, marker = _client(cluster, tmp_path, 2.0)
    try:
        wait_for(lambda: os.path.exists(marker), timeout=30, what="the task to start")
        assert len(_files(where)) == 1  # the argument
    finally:
        p.kill()
        p.wait(10)
    assert os.path.isdir(where)  # nothing swept it yet: the task still runs
    wait_for(lambda: not os.path.exists(where), timeout=20,
             what="the task process to sweep the dead client's directory")


def test_a_killed_clients_files_are_swept_by_the_next_executor(cluster, tmp_path, monkeypatch):
    """The client dies before any worker took its task (none runs): the next executor to
    start on this machine sweeps its directory."""
    monkeypatch.setenv("MINIRAY_SHM", "2")
    p, where, _ = _client(cluster, tmp_path, 0.0)
    p.kill()
    p.wait(10)
    assert len(_files(where)) == 1
    with cluster.executor() as ex:
        assert ex._shm is not None
        assert not os.path.exists(where)


def test_the_embedded_cluster_takes_arguments_through_shared_memory(monkeypatch):
    """On the local cluster every worker is on this machine: arguments go by default."""
    import miniray

    monkeypatch.delenv("MINIRAY_REDIS_URL", raising=False)
    monkeypatch.delenv("MINIRAY_SHM", raising=False)
    a = _big()
    try:
        with miniray.Executor(max_workers=1) as ex:
            assert ex._shm_args()
            sent = _server_input(ex)
            doubled, total, mapped = ex.submit(shm_tasks.double, a).result(timeout=60)
            assert _server_input(ex) - sent < 1 << 20
            assert mapped >= a.nbytes and np.array_equal(doubled, a * 2)
            where = ex._shm.dir
            wait_for(lambda: _files(where) == [], timeout=10, what="the files to go")
        assert not os.path.exists(where)
    finally:
        miniray.shutdown()


def test_kept_jobs_do_not_use_shared_memory(cluster):
    """A kept job's results outlive its client: they must not live in its directory."""
    cluster.start_worker(name="solo")
    with cluster.executor(keep=True) as ex:
        assert ex._shm is None and ex._shm_args is None
        doubled, _, mapped = ex.submit(shm_tasks.double, np.ones(1 << 18)).result(timeout=60)
        assert mapped == 0 and doubled.sum() == 2 * (1 << 18)


def test_a_cancelled_tasks_argument_is_freed_at_once(every_worker_here):
    """No worker: the task stays queued; cancelling it unlinks its argument's file."""
    cluster = every_worker_here
    with cluster.executor() as ex:
        fut = ex.submit(shm_tasks.double, _big())
        wait_for(lambda: len(_files(ex._shm.dir)) == 1, timeout=10, what="the argument's file")
        assert fut.cancel()
        wait_for(lambda: _files(ex._shm.dir) == [], timeout=10, what="the files to go")


def _private_shm_ok() -> bool:
    """Root may give a process a /dev/shm of its own (as a container on this machine has)."""
    if os.geteuid() != 0:
        return False
    probe = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c",
                            "mount -t tmpfs tmpfs /dev/shm"], capture_output=True)
    return probe.returncode == 0


def test_arguments_use_shared_memory_until_a_worker_that_cannot_see_it_joins(monkeypatch):
    """A server on this machine reached by its URL (the persistent cluster, a `miniray up`)
    takes arguments through /dev/shm while every worker sees it; a worker with a /dev/shm of
    its own (a container here; `%miniray ssh` hosts alike) joins, and its task gets the
    argument through the server instead of failing on a file it cannot open."""
    import miniray
    from miniray import Limits
    from miniray.cluster.server import ServerProcess

    from support import worker_env

    monkeypatch.delenv("MINIRAY_SHM", raising=False)
    monkeypatch.setenv("MINIRAY_NAMESPACE", "shmhere")
    srv = ServerProcess()  # a unix socket: on this machine
    env = worker_env(srv.url, "shmhere")
    procs = [subprocess.Popen([sys.executable, "-m", "miniray.worker", "--name", "here"],
                              env=env, stderr=subprocess.DEVNULL)]
    try:
        a = np.arange(4 << 20, dtype=np.float64)  # 32 MB
        with miniray.Executor(redis_url=srv.url) as ex, \
                miniray.Executor(redis_url=srv.url, limits=Limits(nodes=["away"])) as to_away:
            wait_for(lambda: len(ex.workers()) == 1, timeout=30, what="the worker")
            doubled, _, mapped = ex.submit(shm_tasks.double, a).result(timeout=60)
            assert mapped >= a.nbytes and np.array_equal(doubled, a * 2)
            if not _private_shm_ok():
                pytest.skip("needs root and unshare for a worker with a /dev/shm of its own")
            procs.append(subprocess.Popen(
                ["unshare", "--mount", "--propagation", "private", "sh", "-c",
                 "mount -t tmpfs tmpfs /dev/shm && exec \"$0\" -m miniray.worker --name away",
                 sys.executable], env=env, stderr=subprocess.DEVNULL))
            wait_for(lambda: len(ex.workers()) == 2, timeout=30, what="the worker away")
            wait_for(lambda: not to_away._shm_args(), timeout=10, what="shm arguments to stop")
            away = to_away.submit(shm_tasks.double, a)
            doubled, _, mapped = away.result(timeout=60)
            assert mapped == 0 and np.array_equal(doubled, a * 2)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)
        srv.close()
