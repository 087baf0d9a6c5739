"""The embedded local cluster: a private server plus worker processes, owned by this process.

``miniray.Executor()`` with no address starts it on first use; ``miniray.init()`` starts it
explicitly; it is torn down by ``miniray.shutdown()`` or at interpreter exit. Workers die with
this process even when it is killed (parent-death signal and a parent-pid check), and run in
their own sessions, so an interrupt of this process (Ctrl-C, the Jupyter kernel's interrupt,
which signals the kernel's whole process group) reaches none of them.

The machine's GPUs (those this process may use: ``CUDA_VISIBLE_DEVICES``, else every one
NVML lists) belong to one worker, ``local-0``, with a slot per GPU at least; the others own
none. Each worker keeps its own pool of GPUs, so several workers owning the same GPUs would
hand one GPU to several tasks at once (and show it once per worker).

``init(persist=True)`` points this process at the persistent local cluster instead
(``miniray.persistent``: a background service that outlives the process).
"""

from __future__ import annotations

import atexit
import os
import queue
import subprocess
import sys
import threading
import time
from typing import TYPE_CHECKING

from miniray.config import settings
from miniray.errors import ConfigurationError

from .server import ServerProcess

if TYPE_CHECKING:
    from .persistent import PersistentCluster

__all__ = ["LocalCluster", "init", "shutdown", "get_local_cluster"]

_lock = threading.Lock()
_lock_spawner = threading.Lock()
_cluster: "LocalCluster | None" = None
_persist: "tuple | None" = None  # (workers,) after init(persist=True): use the persistent one


class LocalCluster:
    """A server on a unix socket with a random password, and ``workers`` worker processes."""

    def __init__(self, workers: int | None = None, slots: int = 1, server_bin: str | None = None):
        n = workers if workers is not None else (settings().local_workers or os.cpu_count() or 1)
        if not isinstance(n, int) or n < 1:
            raise ConfigurationError(
                f"workers={n!r}: a local cluster needs at least one worker "
                "(miniray.init(workers=N) or MINIRAY_LOCAL_WORKERS)")
        self.nworkers, self.slots = n, slots
        from miniray.worker import gpu

        try:
            self.gpus = len(gpu.own(None).gpus)  # (local-0 owns them: see the top)
        except ConfigurationError:
            self.gpus = 0  # (the workers will say what is wrong with the environment)
        # Workers start while the server does; they wait for it to accept connections.
        self.server = _from_lasting_thread(ServerProcess, server_bin, wait=False)
        self.url = self.server.url
        self._closing = False
        self.started = time.time()
        self._log = open(os.path.join(self.server.dir, "workers.log"), "ab")
        self.procs: list[subprocess.Popen] = [self._spawn(i) for i in range(n)]
        try:
            self.server.wait_ready()
        except Exception:
            self.close()
            raise
        self._monitor = threading.Thread(target=self._watch, daemon=True,
                                         name="miniray-local-cluster")
        self._monitor.start()

    @property
    def log_path(self) -> str:
        return os.path.join(self.server.dir, "workers.log")

    def _spawn(self, i: int) -> subprocess.Popen:
        env = dict(os.environ)
        env["MINIRAY_REDIS_URL"] = self.url  # in the environment, not on a visible command line
        env.setdefault("PYTHONUNBUFFERED", "1")
        slots, gpus = self.slots, []
        if self.gpus and i == 0:
            slots = max(slots, self.gpus)
        elif self.gpus:
            gpus = ["--gpus", "none"]
        return _from_lasting_thread(
            subprocess.Popen,
            [sys.executable, "-m", "miniray.worker", "--slots", str(slots), *gpus,
             "--name", f"local-{i}", "--cpu-offset", str(i), "--parent-pid", str(os.getpid())],
            env=env, stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log,
            close_fds=True,
            # its own session, as the server's: an interrupt of this process (Ctrl-C in a
            # terminal, Jupyter's SIGINT to the kernel's process group) cancels work, it
            # never stops the cluster; the worker dies with this process all the same
            # (parent-death signal and the --parent-pid check)
            start_new_session=True,
        )

    def _watch(self) -> None:
        """Replace a worker that died (killed, crashed) while the cluster is up."""
        while not self._closing:
            time.sleep(0.5)
            if self._closing or not self.server.alive():
                continue
            for i, p in enumerate(self.procs):
                if p.poll() is not None and not self._closing:
                    self.procs[i] = self._spawn(i)

    def server_alive(self) -> bool:
        return self.server.alive()

    def worker_pids(self) -> list[int]:
        return [p.pid for p in self.procs if p.poll() is None]

    def close(self, timeout: float = 5.0) -> None:
        self._closing = True
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        deadline = time.monotonic() + timeout
        for p in self.procs:
            try:
                p.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        self.server.close()
        self._log.close()

    def __repr__(self) -> str:
        return f"<miniray.LocalCluster workers={self.nworkers} alive={len(self.worker_pids())}>"


_spawner: "queue.SimpleQueue | None" = None


def _from_lasting_thread(fn, *args, **kwargs):
    """Call ``fn`` (which starts a process) from a thread that lives as long as this process.

    The server and the workers use the parent-death signal, which Linux sends when the
    *thread* that forked them exits. Started from a short-lived thread (a widget callback, a
    thread pool), they would die with it; the main thread and this daemon thread last.
    """
    global _spawner
    if threading.current_thread() is threading.main_thread():
        return fn(*args, **kwargs)
    with _lock_spawner:
        if _spawner is None:
            _spawner = queue.SimpleQueue()

            def serve(q):
                while True:
                    job, box, done = q.get()
                    try:
                        box.append((True, job()))
                    except BaseException as e:  # handed back to the caller
                        box.append((False, e))
                    done.set()

            threading.Thread(target=serve, args=(_spawner,), daemon=True,
                             name="miniray-spawner").start()
    box: list = []
    done = threading.Event()
    _spawner.put((lambda: fn(*args, **kwargs), box, done))
    done.wait()
    ok, value = box[0]
    if not ok:
        raise value
    return value


def get_local_cluster(workers: int | None = None) -> "LocalCluster | PersistentCluster":
    """This process's embedded cluster, started on first use (with ``workers`` workers); or,
    after ``init(persist=True)``, the persistent cluster (started again if it stopped)."""
    global _cluster
    if _persist is not None:
        from .persistent import start

        return start(workers=_persist[0])
    with _lock:
        if _cluster is None or not _cluster.server_alive():
            if _cluster is not None:
                _cluster.close()
            _cluster = LocalCluster(workers)
        return _cluster


def init(workers: int | None = None, slots: int = 1, persist: bool = False):
    """Start the local cluster now (with ``workers`` worker processes).

    Later ``miniray.Executor()`` calls without an address in this process use it. Calling
    ``init`` again with another worker count restarts the embedded cluster.

    ``persist=True`` starts the persistent local cluster instead (``miniray.persistent``), or
    reuses the one running (whatever its size): a per-user background service that outlives
    this process, found by every later ``init(persist=True)``, ``%miniray local --persist``
    and ``miniray status``; it stops on ``miniray down`` or after ``MINIRAY_IDLE_STOP_SECONDS``
    without work (and starts again at this process's next ``Executor()``). Returns its
    ``PersistentCluster`` (``url``, ``pid``, ``started``, ``workers``).
    """
    global _cluster, _persist
    if persist:
        from .persistent import start

        if slots != 1:
            raise ConfigurationError("init(persist=True) runs one slot per worker; leave "
                                     "slots out (or use persist=False)")
        info = start(workers=workers)
        _persist = (workers,)
        return info
    _persist = None
    with _lock:
        if _cluster is not None and _cluster.server_alive() and (
                workers is None or workers == _cluster.nworkers) and slots == _cluster.slots:
            return _cluster
        if _cluster is not None:
            _cluster.close()
        _cluster = LocalCluster(workers, slots)
        return _cluster


def shutdown() -> None:
    """Stop the embedded local cluster (its server and workers), if one is running, and
    forget the persistent cluster of ``init(persist=True)`` (which keeps running:
    ``miniray down`` or ``miniray.persistent.stop()`` stops it)."""
    global _cluster, _persist
    with _lock:
        cluster, _cluster = _cluster, None
        _persist = None
    if cluster is not None:
        for fn in list(_before_stop):
            fn()
        cluster.close()


def before_stop(fn) -> None:
    """Have ``shutdown()`` call ``fn()`` before it stops the embedded cluster (the client's
    executors shut down first, so none waits on a server that is gone)."""
    if fn not in _before_stop:
        _before_stop.append(fn)


_before_stop: list = []
atexit.register(shutdown)
