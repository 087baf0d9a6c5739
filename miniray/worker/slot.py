"""A worker's slot: a thread that owns one task process and supervises it.

::

    heartbeat thread --cancel_job/stop_chunk--> Slot (this thread) --run/cancel/drop--> task process
                                                 |  step(): fetch (GPU workers) -> dispatch
                                                 |          -> collect -> deadlines -> death
    task process --claimed/done/handoff--------> |
    the process's death --------------------------> slotdeath.handle_death: blame, resend
    failures found here ---------------------------> slotreports: one pipeline per 20 ms

On a worker without GPUs the task process claims and completes by itself; the slot learns from
it what it holds and what it delivered (``claimed``, ``done``), enforces timeouts and cancels,
has its death explained (``slotdeath``), and resends what a dead process held to a fresh one.
On a GPU worker the slot claims (one chunk at a time, under the GPU lock) and sends chunks to
the process, which still completes them by itself. A slot keeps a few paused processes of
other limits (``park``) for jobs that alternate.
"""

from __future__ import annotations

import collections
import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from miniray.backoff import Backoff
from miniray.broker import HAND_LEN, Broker, parse_claim
from miniray.errors import MinirayError
from miniray.keys import Keys
from miniray.protocol import encode_batches
from miniray.resp import ConnectionLost, NoScriptError, RedisError

from . import slotdeath
from .slotchunk import Chunk, cancelled_error, decode_head, spec_of
from .slotreports import SlotReports
from .taskslot import TaskProcess

if TYPE_CHECKING:
    from .supervisor import Worker

__all__ = ["Slot"]

log = logging.getLogger("miniray.worker")
_SPARES = 2  # processes of other limits a slot keeps (see Slot.park)


class Slot(threading.Thread):
    """One slot: a task process and its supervision (see the module's docstring)."""

    def __init__(self, worker: Worker, index: int):
        super().__init__(name=f"miniray-slot-{index}", daemon=True)
        self.w, self.index = worker, index
        self.direct = not worker.gpu_ids
        self.r = worker.new_client()
        self.broker = Broker(self.r, worker.namespace)
        self.proc: TaskProcess | None = worker.warm_procs[index]
        self.proc.greet(self.hello())
        # processes of other limits, paused and holding nothing, kept for when jobs with
        # those limits come back (jobs that alternate would restart a process every time)
        self.spare: dict[tuple, TaskProcess] = {}
        self.pending: collections.deque[Chunk] = collections.deque()  # to send to the process
        self.inflight: dict[int, Chunk] = {}  # held by the process
        self.seq = 0
        self.gpus: tuple = ()  # GPUs reserved in the worker's pool for the chunks held now
        self.gpu_mb = 0  # MiB reserved on each of them (0: whole GPUs)
        self.last_gpus: tuple = ()  # the task process's GPUs: preferred at the next claim
        self.cancelled_jobs: dict[str, float] = {}  # job -> kill deadline
        # chunks their client stopped (Ctrl-C in its map): (job, chunk id) -> kill deadline
        self.stopped: dict[tuple, float] = {}
        self.to_tell: collections.deque = collections.deque()  # cancels/drops for the process
        self.lock = threading.Lock()
        self.reports = SlotReports(worker, self.r, self.broker, index)  # failures it found
        self.waiter = worker.keys.waiter(worker.worker_id, index)  # its member of `idle`

    def hello(self) -> dict:
        w = self.w
        return {"url": w.url, "namespace": w.namespace, "worker_id": w.worker_id,
                "name": w.name, "host": w.host, "ncpus": w.ncpus, "slot": self.index,
                "direct": self.direct}

    def new_proc(self, key, claiming: bool = True) -> TaskProcess:
        proc = TaskProcess(key, f"{self.w.name}-{self.index}", self.w.task_env,
                           dict(self.hello(), claiming=claiming), self.w.gpu_names)
        proc.set_flags(int(self.w.triton_ready()))
        return proc

    def proc_for(self, key, claiming: bool = True) -> TaskProcess:
        """A process with the limits ``key``: a spare one if there is one, else a new one."""
        proc = self.spare.pop(key, None)
        if proc is None:
            return self.new_proc(key, claiming)
        proc.set_flags(int(self.w.triton_ready()))
        if claiming:
            proc.resume()
        return proc

    def park(self) -> None:
        """Put the process aside for its limits' next turn (it holds nothing): paused, it
        claims nothing and waits for the worker. The oldest spare goes beyond _SPARES. One
        with GPUs is closed instead: what it keeps on them would be in the next task's way."""
        proc, self.proc = self.proc, None
        self.unregister()
        if proc.key[2]:
            proc.close()
            return
        proc.pause()  # (after a handoff it paused itself; now the worker knows it)
        self.spare[proc.key] = proc
        while len(self.spare) > _SPARES:
            self.spare.pop(next(iter(self.spare))).close()

    def all_procs(self) -> list:
        return ([self.proc] if self.proc is not None else []) + list(self.spare.values())

    # -- state seen by the heartbeat thread ------------------------------------------------
    def jobs(self) -> set:
        # list() of a dict view copies it in one step under the GIL: the slot thread may be
        # changing these while the heartbeat thread reads them
        jobs = {c.job for c in list(self.inflight.values()) + list(self.pending)}
        job = self.running_job()
        if job is not None:
            jobs.add(job)
        return jobs

    def running_job(self) -> str | None:
        return self.running()[0]

    def running(self) -> tuple:
        """(job, task id) of the item running now, or (None, None)."""
        proc = self.proc
        if proc is None:
            return None, None
        seq, idx, _ = proc.progress()
        c = self.inflight.get(seq)
        if c is None:
            if seq < 0 or not self.direct:
                return None, None
            # a chunk the process claimed and has not told us of yet: its job is on the page
            seq, job, _ = proc.running_chunk()
            return job, None
        return c.job, (c.start + idx if idx >= 0 else None)

    def running_chunk(self) -> tuple | None:
        """(job, chunk id) of the chunk running now, or None."""
        proc = self.proc
        if proc is None:
            return None
        seq = proc.progress()[0]
        c = self.inflight.get(seq)
        if c is not None:
            return c.job, c.chunk
        if seq < 0 or not self.direct:
            return None
        _, job, chunk = proc.running_chunk()  # one it claimed and has not told us of yet
        return None if job is None else (job, chunk)

    def cancel_job(self, job: str) -> None:
        with self.lock:
            if job in self.cancelled_jobs:
                return
            self.cancelled_jobs[job] = time.monotonic() + self.w.settings.kill_grace_seconds
        self.to_tell.append(("cancel", job))  # the slot thread tells the process (it owns
        proc = self.proc  # the socket)
        if proc is not None and self.running_job() == job:
            proc.interrupt()

    def stop_chunk(self, job: str, chunk: int) -> None:
        """One chunk of ``job`` was stopped by its client: interrupted if it runs here now
        (SIGINT, then killed after the grace if it still runs), dropped unstarted if it
        waits here or in the process; the job's other chunks go on."""
        key = (job, chunk)
        with self.lock:
            if key in self.stopped:
                return
            self.stopped[key] = time.monotonic() + self.w.settings.kill_grace_seconds
        self.to_tell.append(("drop", job, chunk))
        proc = self.proc
        if proc is not None and self.running_chunk() == key:
            proc.interrupt()

    # -- main loop ---------------------------------------------------------------------------
    def run(self) -> None:
        backoff = Backoff()
        try:
            while not self.w.stopping.is_set():
                try:
                    self.step()
                    backoff.tries = 0
                except ConnectionLost as e:
                    if not self.w.server_gone(e):
                        self.w.stopping.wait(backoff.next())
                except NoScriptError:  # the server restarted and lost our scripts
                    self.broker.load_scripts()
        except Exception:  # a bug must not leave the worker half-alive
            log.exception("slot %d failed; stopping the worker", self.index)
            self.w.failed = True
            self.w.stop()
        finally:
            for proc in self.all_procs():
                proc.close(graceful=False)

    def step(self) -> None:
        if not self.direct and not self.pending and not self.inflight:
            self.release_gpus()
            self.fetch()
            if not self.pending:
                return
        self.dispatch()
        if self.proc is None:  # direct: a process is always there to claim
            self.proc = self.proc_for((None, (), ()))
        self.collect()

    def fetch(self) -> None:
        """A GPU worker's claim: one chunk, under the pool's claim lock, its GPUs reserved
        before letting go, so what the claim script was told is free stays free. A claim
        that finds nothing registers the slot as idle; it then waits for a chunk handed over
        (one without requirements: no GPUs to reserve) or a wake-up (the next step claims)."""
        pipe = self.r.pipeline()
        self.reports.drain(pipe)
        if len(pipe):
            pipe.execute()
        claimed = self.claim_gpu_chunk()
        if not claimed:  # registered as idle: wait for a chunk handed over or a wake-up
            hand = self.w.keys.hand(self.waiter)
            got = self.r.execute("BLMPOP", 1, 2, hand, self.w.keys.wake(self.waiter), "LEFT",
                                 "COUNT", HAND_LEN)
            claimed = got[1] if got and got[0] == hand.encode() else None
        if claimed:
            job, spec_raw, chunks = parse_claim(claimed)
            self.take(job, spec_raw, chunks)

    def claim_gpu_chunk(self):
        w = self.w
        with w.gpu_claim_lock:
            free, free_mb = w.gpu_pool.offer()
            claimed = self.broker.claim(w.worker_id, 1, w.name, w.host, free, w.ncpus,
                                        gpu_free_mb=free_mb, triton=w.triton_ready(),
                                        slot=self.index, register=True,
                                        maxlen=w.settings.event_stream_maxlen)
            if claimed:
                spec = spec_of(claimed[0].decode(), claimed[1])[0]  # (bad: take fails it)
                if spec.get("gpus"):
                    mb = spec.get("gpu_mem") or 0
                    got = w.gpu_pool.acquire(spec["gpus"], mb, prefer=self.last_gpus)
                    if got is None:  # cannot happen while every claim holds the lock
                        raise RuntimeError(f"claimed {spec['gpus']} GPU(s) that are not free")
                    self.gpus, self.gpu_mb, self.last_gpus = got, mb, got
        return claimed

    def unregister(self) -> None:
        """The slot's process is gone: wake-ups must go to slots that wait (its successor
        registers when it finds nothing to claim), and a chunk handed to it and not claimed
        yet is in ``wip`` for ``unannounced`` (its successor must not claim it again)."""
        if self.direct:
            try:
                self.r.pipeline().command("ZREM", self.w.keys.idle, self.waiter).command(
                    "DEL", self.w.keys.hand(self.waiter)).execute()
            except RedisError:
                pass  # the server is gone: so is what it knew

    def take(self, job: str, spec_raw, chunks: list) -> None:
        """Chunks (entry, chunk id, frames) for ``pending``: claimed here or handed over."""
        spec, bad = spec_of(job, spec_raw)
        got = []
        for entry, chunk_id, frames in chunks:
            self.seq += 1
            c = Chunk(job, entry, chunk_id, self.seq, None, 0, Keys.parse_entry(entry)[2],
                       None, spec, bad=bad)
            if bad is None:
                decode_head(c, frames)
            got.append(c)
        init = spec.get("init")
        missing = self.w.functions_missing({c.sha for c in got if c.sha} |
                                           ({init} if init else set()), self.r)
        for c in got:
            if c.bad is not None:
                self.pending.append(c)  # dispatch fails it, in its turn
            elif c.sha in missing or init in missing:
                self.fail_chunk(c, MinirayError(
                    f"the function of job {c.job} is no longer in Redis (it expired after "
                    f"MINIRAY_FUNCTION_TTL_SECONDS or the server restarted); submit again"))
            else:
                self.pending.append(c)

    def release_gpus(self) -> None:
        """Give this slot's GPUs back to the pool (it holds no chunk any more)."""
        if self.gpus:
            self.w.gpu_pool.release(self.gpus, self.gpu_mb)
            self.gpus, self.gpu_mb = (), 0

    def key_for(self, spec: dict) -> tuple:
        mem = spec.get("memory_bytes")
        cpus = ()
        if spec.get("cpus"):
            cpus = self.w.cpus_for_slot(self.index, spec["cpus"])
        # GPUs were reserved when the chunk was claimed (see fetch)
        return (mem, cpus, self.gpus if spec.get("gpus") else ())

    def dispatch(self) -> None:
        """Send every pending chunk the current task process can take, in one message."""
        batch = []
        while self.pending:
            c = self.pending[0]
            if c.job in self.cancelled_jobs or c.bad is not None \
                    or (self.stopped and (c.job, c.chunk) in self.stopped):
                self.pending.popleft()
                self.fail_chunk(c, c.bad or cancelled_error(c.job))
                continue
            key = self.key_for(c.spec)
            if self.proc is not None and self.proc.key != key:
                if self.inflight or batch:
                    self.proc.pause()  # claim nothing more: drain, then change limits
                    break
                self.park()
            if self.proc is None:  # it claims nothing until what waits here is sent
                self.proc = self.proc_for(key, claiming=False)
            self.pending.popleft()
            batch.append(c)
        if batch:
            self.send(batch)
        if not self.pending and self.proc is not None:
            self.proc.resume()

    def send(self, batch: list) -> None:
        proc = self.proc
        specs, frames, fns = [], [], []
        for c in batch:
            self.inflight[c.seq] = c
            init = c.spec.get("init")
            for sha in (c.sha, init) if init else (c.sha,):
                if sha not in proc.known_fns:
                    fns.append((sha, self.w.fn_cache.get(sha)))
                    proc.known_fns.add(sha)
            specs.append((c.seq, c.job, c.entry, c.chunk, c.sha, c.start, c.count,
                          frozenset(c.delivered), c.spec, len(c.frames)))
            frames += c.frames
            c.frames = None  # the process has them now; a resend reads them from Redis
        try:
            proc.send_run(specs, fns, frames)
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # the process died; collect() sees EOF and deals with it

    def collect(self) -> None:
        """Wait for the task process; ship what the slot has to say in one pipeline."""
        proc = self.proc
        while self.to_tell:  # it drops what it holds of these jobs/chunks, unstarted
            proc.tell(*self.to_tell.popleft())
        timeout = self.wait_budget()
        died = False
        got = []
        if self.direct:
            # Read what the process says on a clock, not on each message: a woken worker
            # would take the CPU from the tasks (and their clients) at the worst moment. But
            # only once it has said something: a quiet process (idle, or running a long
            # task) costs its worker one wake-up per wait budget, not one every 20 ms.
            if proc.wait_message(timeout):
                proc.wait_urgent(min(timeout, 0.02))
            timeout = 0
        try:
            if proc.poll(timeout):
                got.append(proc.recv())
                while proc.poll(0):
                    got.append(proc.recv())
        except (EOFError, OSError):
            died = True
        for msg in got:
            self.handle(msg)
        if not died:
            self.enforce_deadlines()
        if died or (proc.killed_for and not proc.alive()):
            slotdeath.handle_death(self, proc)
        self.reports.ship(died)

    def wait_budget(self) -> float:
        budget = 0.25 if not self.reports.out else 0.02
        seq, idx, started = self.proc.progress()
        c = self.inflight.get(seq)
        if c is not None and c.spec.get("timeout"):
            budget = min(budget, max(0.0, started + c.spec["timeout"] - time.monotonic()))
        if self.cancelled_jobs or self.stopped:
            budget = min(budget, 0.05)
        return budget

    def enforce_deadlines(self) -> None:
        proc = self.proc
        if proc.killed_for:
            return
        seq, idx, started = proc.progress()
        c = self.inflight.get(seq)
        now = time.monotonic()
        if c is not None and idx >= 0 and c.spec.get("timeout") \
                and now > started + c.spec["timeout"]:
            proc.kill("timeout")
            return
        for job, deadline in list(self.cancelled_jobs.items()):
            if now > deadline:
                if any(x.job == job for x in self.inflight.values()) \
                        or self.running_job() == job:
                    proc.kill("cancel")
                    return
                if not any(x.job == job for x in self.pending):
                    del self.cancelled_jobs[job]
        if self.stopped:
            running = self.running_chunk()
            held = None
            for key, deadline in list(self.stopped.items()):
                if now <= deadline:
                    continue
                if key == running:
                    proc.kill("cancel")
                    return
                # forgotten once no chunk of its job is held here (the heartbeat tells it
                # again while some are: harmless)
                if held is None:
                    held = self.jobs()
                if key[0] not in held:
                    del self.stopped[key]

    def handle(self, msg) -> None:
        kind = msg[0]
        if kind == "batch":
            for m in msg[1]:
                self.handle(m)
        elif kind == "done":
            for seq, final, indices, n_ok, n_err in msg[1]:
                c = self.inflight.get(seq)
                if c is None:
                    continue
                c.delivered.update(range(c.count) if final or indices is None else indices)
                if final:
                    del self.inflight[seq]
        elif kind == "claimed":
            _, job, spec_raw, notes = msg
            spec = spec_of(job, spec_raw)[0]  # (bad: the process fails those chunks itself)
            for seq, entry, chunk, start, count in notes:
                self.inflight[seq] = Chunk(job, entry, chunk, seq, None, start, count, None,
                                            spec)
        elif kind == "handoff":  # claimed by the process, but needs a process of its own
            _, job, spec_raw, chunks = msg
            # it paused itself: if these chunks fail here (cancelled, malformed) rather than
            # go to another process, dispatch must resume it, or the slot claims no more
            self.proc.paused = True
            self.take(job, spec_raw, [(e, Keys.parse_entry(e)[0], f) for e, f in chunks])

    def fail_chunk(self, c: Chunk, exc: BaseException, tb: str = "") -> None:
        left = [i for i in range(c.count) if i not in c.delivered]
        errors = {i: (exc, tb, os.getpid()) for i in left}
        blob = encode_batches([(left, [None] * len(left), errors)])
        c.delivered.update(left)
        self.inflight.pop(c.seq, None)
        self.reports.report(c.job, [(c, True, 0, len(left))], blob)
