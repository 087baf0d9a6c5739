"""The worker supervisor: ``Worker``, the process that ``miniray worker`` runs.

::

    main thread:       watches only: a signal (its handler sets a flag and writes to a
                       pipe), the parent's death, or ``stop`` ends the worker -> shutdown()
    heartbeat thread:  beat(): telemetry (info) into ``worker:{id}``/``workers``, reaping of
                       dead workers, cancels passed on to the slots (``stop:{job}``)
    slot threads:      one per slot (``slot.Slot``), each owning a task process
    shutdown:          kill the task processes, hand held chunks back (``Broker.release``)

The ``Worker`` owns what its slots share: the connection settings and identity, the CPUs and
the GPU pool (claims under ``gpu_claim_lock``), the functions cache read from Redis, the
Triton server, and the processes started at once (``warm_procs``) so a cold start overlaps
them with connecting. A server gone longer than MINIRAY_SERVER_GONE_SECONDS ends the worker
(every thread retries a lost one with backoff until then).
"""

from __future__ import annotations

import collections
import logging
import os
import select
import signal
import socket
import threading
import time
import uuid

from miniray.backoff import Backoff
from miniray.broker import Broker, _redact, connect
from miniray.config import settings
from miniray.errors import ConfigurationError, ServerError
from miniray.resp import Connection, ConnectionLost, RedisError
from miniray.values import shm

from . import gpu as gpu_mod
from .isolation import memory_cgroup_support
from .slot import Slot
from .taskslot import TaskProcess
from .usage import ProcessUsage

__all__ = ["Worker"]

log = logging.getLogger("miniray.worker")
_FN_CACHE = 256
_RELEASE_WAIT = 10.0  # seconds a leaving worker waits for the server to take its work back


class Worker:
    """A worker process: ``slots`` task processes fed from the server at ``redis_url``."""

    def __init__(self, redis_url: str, slots: int = 1, gpus=None, name: str | None = None,
                 namespace: str | None = None, cpu_offset: int = 0, parent_pid: int | None = None,
                 gpu_memory_gb: float | None = None, triton=None):
        self.settings = settings()
        self.url = redis_url
        _check_url_security(redis_url)
        self.namespace = namespace or self.settings.namespace
        self.host = socket.gethostname()
        self.name = name or f"{self.host}-{os.getpid()}"
        self.worker_id = f"{self.name}-{uuid.uuid4().hex[:8]}"
        if slots < 1:
            raise ConfigurationError(f"--slots must be at least 1, not {slots}")
        self.nslots = slots
        self.parent_pid = parent_pid
        self.cpu_offset = cpu_offset
        self.allowed_cpus = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
            else list(range(os.cpu_count() or 1))
        self.ncpus = len(self.allowed_cpus)
        owned = gpu_mod.own(gpus)  # --gpus, else CUDA_VISIBLE_DEVICES, else NVML's list
        self.gpus_owned, self.gpu_note, self.gpu_ids = owned.gpus, owned.note, owned.ids
        self.gpu_names = {g.id: g.name for g in owned.gpus}  # for tasks' CUDA_VISIBLE_DEVICES
        if gpu_memory_gb is not None:
            if gpu_memory_gb <= 0:
                raise ConfigurationError(
                    f"--gpu-memory {gpu_memory_gb:g}: give each GPU's memory in GB, e.g. 80")
            capacity = {i: int(gpu_memory_gb * 1024) for i in self.gpu_ids}
        else:
            capacity = gpu_mod.memory_totals(self.gpus_owned)
        self.gpu_pool = gpu_mod.GpuPool(self.gpu_ids, capacity)
        self.gpu_claim_lock = threading.Lock()
        self.task_env = dict(os.environ)
        # a miniray.triton.server.TritonServer or None; the claim reads its `ready`
        self.triton = triton
        if triton is not None:  # what miniray.triton needs in a task: the server and Redis
            self.task_env.update(triton.task_env())
            self.task_env.update(MINIRAY_REDIS_URL=redis_url, MINIRAY_NAMESPACE=self.namespace)
        self.stopping = threading.Event()
        self._beaten = False  # a heartbeat went out (see heartbeat: rejoin)
        self.fn_cache: collections.OrderedDict[str, bytes] = collections.OrderedDict()
        self._fn_lock = threading.Lock()
        self.usage = ProcessUsage()  # this worker's own CPU and memory (see miniray.worker.usage)
        self.started = time.time()
        # Task processes start now, while this process connects: a cold start pays for
        # both at once rather than one after the other.
        self.warm_procs = [TaskProcess((None, (), ()), f"{self.name}-{i}", self.task_env)
                           for i in range(slots)]
        self.r = self.new_client(wait=10.0)
        self.broker = Broker(self.r, self.namespace)
        self.keys = self.broker.keys
        self.slots: list[Slot] = []
        self._server_lost_since: float | None = None
        self.gave_up: str | None = None  # why the worker stopped trying to reach its server
        self.failed = False  # a thread of the worker failed (a bug): exit non-zero
        # A signal handler only sets `signalled` and writes a byte here (no lock: a second
        # signal during the first's handling must not deadlock); the main thread waits on it.
        self.signalled = 0
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self.isolation = memory_cgroup_support()[0] or "rlimit"

    def new_client(self, wait: float = 0.0) -> Connection:
        """A connection; with ``wait``, keep trying that long for a server still starting."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return connect(self.url)
            except ServerError as e:
                if not getattr(e, "unreachable", False) or time.monotonic() > deadline:
                    raise
                time.sleep(0.01)

    # -- resources ---------------------------------------------------------------------------
    def cpus_for_slot(self, slot: int, n: int) -> tuple:
        cpus = self.allowed_cpus
        base = (self.cpu_offset + slot) * n
        return tuple(cpus[(base + i) % len(cpus)] for i in range(min(n, len(cpus))))

    def triton_ready(self) -> bool:
        """True while this worker's Triton server answers its health check."""
        triton = getattr(self, "triton", None)
        return bool(triton is not None and triton.ready)

    def functions_missing(self, shas: set, r) -> set:
        with self._fn_lock:
            need = [s for s in shas if s not in self.fn_cache]
        if not need:
            return set()
        values = r.execute("MGET", *[self.keys.fn(s) for s in need])
        missing = set()
        with self._fn_lock:
            for sha, data in zip(need, values):
                if data is None:
                    missing.add(sha)
                else:
                    self.fn_cache[sha] = data
            while len(self.fn_cache) > _FN_CACHE:
                self.fn_cache.popitem(last=False)
        return missing

    # -- lifecycle ---------------------------------------------------------------------------
    def info(self) -> dict:
        import psutil

        running = [job for job in (s.running_job() for s in self.slots) if job]
        busy = len(running)
        gpus = gpu_mod.telemetry(self.gpus_owned)
        for slot in self.slots:  # which job holds each GPU (from its claim to its end)
            job, task = slot.running()
            job = job or next(iter(sorted(slot.jobs())), None)
            for g in gpus:
                if job and g["index"] in slot.gpus:
                    g["job"] = job  # packed GPUs: one of them; "jobs" lists them all
                    g.setdefault("jobs", []).append(job)
                    if task is not None:  # and the task running on it now ("tasks")
                        g["task"] = task
                        g.setdefault("tasks", []).append(task)
        for g in gpus:
            if self.gpu_pool.used.get(g["index"]):
                g["reserved"] = self.gpu_pool.used[g["index"]] * 2**20
        mem = psutil.virtual_memory()
        # (tasks_done is counted by the complete script in the worker's hash: see observe)
        proc_cpu, proc_rss = self.usage.sample()  # (its task processes are its children)
        return {
            "name": self.name, "host": self.host, "pid": os.getpid(), "slots": self.nslots,
            "busy": busy, "jobs": sorted(running), "started": self.started,
            "cpu_percent": psutil.cpu_percent(None), "cpus": self.ncpus,
            "ram_used": mem.used, "ram_total": mem.total,
            "proc_cpu_percent": round(proc_cpu, 1), "proc_rss": proc_rss,
            "isolation": self.isolation, "gpus": gpus, "gpu_note": self.gpu_note,
            "shm": shm.domain(),
            **({"triton": self.triton.describe()} if self.triton is not None else {}),
        }

    def server_gone(self, error: Exception) -> bool:
        """Note a lost connection; True (and stop) once it has been gone longer than
        MINIRAY_SERVER_GONE_SECONDS. Until then every thread retries with ``Backoff``: a
        restarted server gets its workers back without anyone restarting them."""
        now = time.monotonic()
        if self._server_lost_since is None:
            self._server_lost_since = now
            log.warning("lost the server at %s: %s; retrying", _redact(self.url), error)
        limit = self.settings.server_gone_seconds
        if now - self._server_lost_since > limit:
            if self.gave_up is None:
                self.gave_up = (
                    f"the server at {_redact(self.url)} has been unreachable for {limit:g} s "
                    f"(MINIRAY_SERVER_GONE_SECONDS) ({error}); worker {self.name} exits for its "
                    "supervisor to restart it. Start the server again, or check the address")
                log.error("%s", self.gave_up)
            self.stop()
            return True
        return False

    def stop(self) -> None:
        self.stopping.set()
        self.wake()

    def on_signal(self, signum, frame) -> None:
        """SIGTERM/SIGINT (and the parent's death): note it; the main thread stops."""
        self.signalled = signum
        self.wake()

    def wake(self) -> None:
        try:
            os.write(self._wake_w, b"!")
        except OSError:  # full (it will wake anyway) or closed
            pass

    def nap(self, seconds: float) -> None:
        """Sleep up to ``seconds``; a signal or ``stop`` ends it at once."""
        select.select([self._wake_r], [], [], seconds)
        try:
            while os.read(self._wake_r, 4096):
                pass
        except OSError:
            pass

    def run(self) -> int:
        s = self.settings
        if self.gpu_note:
            log.info("%s", self.gpu_note)
        if self.isolation == "rlimit":
            log.warning("memory limits use RLIMIT_AS on this host: %s", memory_cgroup_support()[1])
        if self.triton is not None:
            self.triton.start(self.new_client, self.namespace)
        self.heartbeat()
        self.slots = [Slot(self, i) for i in range(self.nslots)]
        for slot in self.slots:
            slot.start()
        log.info("worker %s: %d slot(s), GPUs %s, server %s", self.name, self.nslots,
                 self.gpu_ids or "none", _redact(self.url))
        # the main thread only watches (signals, the parent), so it never waits on a server
        # that hangs: a SIGTERM then still ends the worker in bounded time
        threading.Thread(target=self.beat, name="miniray-heartbeat", daemon=True).start()
        while not self.stopping.is_set():
            if self.signalled:
                log.info("worker %s: %s; handing its work back and exiting", self.name,
                         signal.Signals(self.signalled).name)
                break
            if self.parent_pid and os.getppid() != self.parent_pid:
                log.warning("the process that started this worker is gone; exiting")
                break
            self.nap(min(1.0, s.heartbeat_seconds))
        self.shutdown()
        return 1 if self.failed else 75 if self.gave_up else 0

    def beat(self) -> None:
        """The heartbeat thread: telemetry, cancels, reaping; retries a lost server."""
        s = self.settings
        backoff = Backoff()
        next_beat = time.monotonic()
        while not self.stopping.is_set():
            try:
                self.heartbeat()
                self.broker.reap(s.worker_dead_seconds, s.max_retries, s.event_stream_maxlen,
                                 s.result_ttl_seconds)
                self._server_lost_since = None
                backoff.tries = 0
                next_beat += s.heartbeat_seconds
            except ConnectionLost as e:
                if self.server_gone(e):
                    return
                next_beat = time.monotonic() + backoff.next()
            except Exception:  # a bug must not leave the worker without a heartbeat
                log.exception("the heartbeat failed; stopping the worker")
                self.failed = True
                self.stop()
                return
            self.stopping.wait(max(0.0, next_beat - time.monotonic()))

    def heartbeat(self) -> None:
        s = self.settings
        jobs = set()
        for slot in self.slots:
            jobs |= slot.jobs()
        reply = self.broker.heartbeat(self.worker_id, self.info(),
                                      int(3 * s.worker_dead_seconds) + 1, sorted(jobs),
                                      rejoin=self._beaten)
        self._beaten = True  # (a later beat that finds us reaped wakes our slots)
        flags = int(self.triton_ready())
        for slot in self.slots:  # what the task processes' own claims need to know
            proc = slot.proc
            if proc is not None:
                proc.set_flags(flags)
        for job in reply[1:]:
            job, _, chunk = job.decode().rpartition("/")
            if job:  # "job/chunk": a chunk its client stopped (see Broker.stop_chunks)
                for slot in self.slots:
                    if job in slot.jobs():
                        slot.stop_chunk(job, int(chunk))
            else:
                for slot in self.slots:
                    slot.cancel_job(chunk)

    def shutdown(self) -> int:
        """Stop the slots, kill task processes, hand held chunks back to the queue."""
        self.stopping.set()
        for slot in self.slots:
            for proc in slot.all_procs():
                proc.kill("shutdown")
        # Slots idle in BLPOP hold nothing; a brief join lets a finishing report land. Work a
        # slot claims after this is refused or handed back: claim needs a registration
        # that release removes in the same step as it requeues.
        deadline = time.monotonic() + 0.1
        for slot in self.slots:
            slot.join(timeout=max(0.0, deadline - time.monotonic()))
        if self.gave_up is None:
            # in a thread: a server that hangs must not hold the exit (the reaper then
            # requeues what this worker held, once its heartbeat is old)
            t = threading.Thread(target=self._release, daemon=True)
            t.start()
            t.join(_RELEASE_WAIT)
            if t.is_alive():
                log.warning("the server did not take this worker's chunks back within %g s; "
                            "they run again once it reaps this worker", _RELEASE_WAIT)
        if self.triton is not None:
            self.triton.stop()
        try:
            self.r.close()
        except Exception:
            pass
        return 0

    def _release(self) -> None:
        try:
            n = self.broker.release(self.worker_id)
            if n:
                log.info("handed %d unfinished chunk(s) back to the queue", n)
        except RedisError as e:
            log.warning("could not hand chunks back (the server is gone?): %s", e)


def _check_url_security(url: str) -> None:
    """Refuse a password-less server unless it is on this machine."""
    from urllib.parse import parse_qs, urlparse

    u = urlparse(url)
    password = u.password or parse_qs(u.query).get("password", [None])[0]
    local = u.scheme == "unix" or (u.hostname or "") in ("127.0.0.1", "localhost", "::1")
    if not password and not local:
        raise ConfigurationError(
            f"refusing the server {_redact(url)}: it has no password and is not on this "
            "machine, so anyone who can reach it could run code here. Use a password "
            "(redis://:PASSWORD@host:port) or an SSH tunnel to a loopback address."
        )
