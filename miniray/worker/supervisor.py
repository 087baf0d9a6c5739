"""``miniray worker``: task processes that pull chunks from Redis, and their supervisor.

::

    Redis                                  task process (one per slot)      worker process
    -----                                  ---------------------------      --------------
    hand:, wake:{slot} --BLMPOP (+ claim)> taskproc.Runner: runs items ---> slot thread:
    res:{client}, logs:{job} <--complete-- (outcomes, log lines)            claimed/done notes,
    wip:{worker} (tagged with the slot)                                     timeouts, cancels,
    workers, worker:{id} <------------------------------------------------- deaths, resends;
                                                                            heartbeat thread

A task process claims, runs and completes by itself (see ``taskproc``), so a task's round trip
has no hop through this process. A slot thread owns one task process (replaced when it
crashes, times out, or a chunk needs other limits) and supervises it: it hears what the
process holds and what it delivered, kills it past a timeout or a cancel's grace, explains its
death to the futures, and sends what it held (payloads read back from Redis) to a fresh one.
On a GPU worker the slot thread claims instead, one chunk at a time under the GPU lock, and
sends chunks to its process. The heartbeat thread reports telemetry, reaps dead workers and
passes cancels on (a cancelled job, or single chunks their client stopped: ``stop:{job}``).
The main thread only watches: a signal (its handler sets a flag and writes to a pipe) or the
parent's death ends the worker, and so does a server gone longer than
MINIRAY_SERVER_GONE_SECONDS (every thread retries a lost one with backoff until then).
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
import traceback
import uuid
from dataclasses import dataclass, field

from . import gpu as gpu_mod
from . import itemblocks
from miniray.backoff import Backoff
from miniray.broker import HAND_LEN, Broker, _redact, connect, parse_claim
from miniray.config import settings
from miniray.errors import (
    ConfigurationError,
    ServerError,
    JobCancelledError,
    MemoryLimitError,
    MinirayError,
    TaskCrashedError,
    TaskTimeoutError,
)
from .isolation import memory_cgroup_support
from .jobspec import chunk_head, parse_spec
from miniray.resp import Connection, ConnectionLost, NoScriptError, RedisError
from miniray.keys import Keys
from miniray.protocol import ResultHeader, encode_batches, encode_result
from miniray.values import shm
from .taskslot import TaskProcess
from .usage import ProcessUsage

__all__ = ["Worker", "main"]

log = logging.getLogger("miniray.worker")
_FN_CACHE = 256
_RELEASE_WAIT = 10.0  # seconds a leaving worker waits for the server to take its work back
_SPARES = 2  # processes of other limits a slot keeps (see _Slot.park)


@dataclass
class _Chunk:
    job: str
    entry: str
    chunk: int
    seq: int
    sha: str
    start: int
    count: int
    frames: list  # the pickle stream (head stripped) and its out-of-band buffers
    spec: dict  # the job's limits and env
    delivered: set = field(default_factory=set)
    bad: BaseException | None = None  # its job's data in Redis is malformed: it fails


class _Slot(threading.Thread):
    """One slot: a task process and its supervision.

    On a worker without GPUs the task process claims and completes by itself; the slot
    learns from it what it holds and what it delivered (``claimed``, ``done``), enforces
    timeouts and cancels, explains its death, and resends what a dead process held to a fresh
    one. On a GPU worker the slot claims (one chunk at a time, under the GPU lock) and sends
    chunks to the process, which still completes them by itself.
    """

    def __init__(self, worker: "Worker", index: int):
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
        self.pending: collections.deque[_Chunk] = collections.deque()  # to send to the process
        self.inflight: dict[int, _Chunk] = {}  # held by the process
        self.seq = 0
        self.gpus: tuple = ()  # GPUs reserved in the worker's pool for the chunks held now
        self.gpu_mb = 0  # MiB reserved on each of them (0: whole GPUs)
        self.last_gpus: tuple = ()  # the task process's GPUs: preferred at the next claim
        self.cancelled_jobs: dict[str, float] = {}  # job -> kill deadline
        # chunks their client stopped (Ctrl-C in its map): (job, chunk id) -> kill deadline
        self.stopped: dict[tuple, float] = {}
        self.to_tell: collections.deque = collections.deque()  # cancels/drops for the process
        self.lock = threading.Lock()
        self.out: list = []  # commands for the next pipeline: (fn, args)
        self.last_out = 0.0
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
        self._drain_out(pipe)
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
                spec = _spec(claimed[0].decode(), claimed[1])[0]  # (bad: take fails it)
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
        spec, bad = _spec(job, spec_raw)
        got = []
        for entry, chunk_id, frames in chunks:
            self.seq += 1
            c = _Chunk(job, entry, chunk_id, self.seq, None, 0, Keys.parse_entry(entry)[2],
                       None, spec, bad=bad)
            if bad is None:
                _decode(c, frames)
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
                self.fail_chunk(c, c.bad or _cancelled(c.job))
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
            self.handle_death(proc)
        # what the slot reports (failures it found) goes every 20 ms at most: a
        # round trip per task would compete with the tasks' own for the server and the CPU
        now = time.monotonic()
        if self.out and (now - self.last_out >= 0.02 or died or len(self.out) > 256):
            self.last_out = now
            pipe = self.r.pipeline()
            self._drain_out(pipe)
            pipe.execute()

    def wait_budget(self) -> float:
        budget = 0.25 if not self.out else 0.02
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
            spec = _spec(job, spec_raw)[0]  # (bad: the process fails those chunks itself)
            for seq, entry, chunk, start, count in notes:
                self.inflight[seq] = _Chunk(job, entry, chunk, seq, None, start, count, None,
                                            spec)
        elif kind == "handoff":  # claimed by the process, but needs a process of its own
            _, job, spec_raw, chunks = msg
            # it paused itself: if these chunks fail here (cancelled, malformed) rather than
            # go to another process, dispatch must resume it, or the slot claims no more
            self.proc.paused = True
            self.take(job, spec_raw, [(e, Keys.parse_entry(e)[0], f) for e, f in chunks])

    def report(self, job: str, done: list, blob: bytes) -> None:
        """Queue one result message for ``job`` (failures the slot itself found): ``done``
        lines up with the blob's batches."""
        w = self.w
        header = ResultHeader(w.worker_id, w.host, os.getpid(),
                              [(c.chunk, final) for c, final, _, _ in done], self.index)
        chunks = [(c.entry, n_ok, n_err, final) for c, final, n_ok, n_err in done]
        self.out.append((self._complete, (job, chunks, encode_result(header, blob))))

    def fail_chunk(self, c: _Chunk, exc: BaseException, tb: str = "") -> None:
        left = [i for i in range(c.count) if i not in c.delivered]
        errors = {i: (exc, tb, os.getpid()) for i in left}
        blob = encode_batches([(left, [None] * len(left), errors)])
        c.delivered.update(left)
        self.inflight.pop(c.seq, None)
        self.report(c.job, [(c, True, 0, len(left))], blob)

    def handle_death(self, proc: TaskProcess) -> None:
        """The task process is gone: fail the item it was running, resend the rest."""
        seq, idx, started = proc.progress()
        _, page_job, page_chunk = proc.running_chunk()
        reason = proc.killed_for
        oom = proc.oom_killed()
        how = proc.death()
        proc.close(graceful=False)
        self.proc = None
        if reason == "shutdown":
            return  # the worker is leaving: shutdown() hands its chunks back, nothing failed
        self.unregister()
        extra = self.unannounced() if self.direct else []
        c = self.inflight.get(seq)
        in_block = idx <= itemblocks.BLOCK_MARK  # in a block of items: nobody to blame
        if c is None and seq >= 0 and (idx >= 0 or in_block):  # claimed, not told us of
            c = next((x for x in extra if (x.job, x.chunk) == (page_job, page_chunk)), None)
            if c is not None and not self.load_frames(c):
                c = None  # the job is gone (cancelled or closed): nothing to report to
        if c is not None and in_block:  # no item blamed: it runs again item by item, where
            c.spec = {**c.spec, itemblocks.EXACT: True}  # a second death names its item
        elif c is not None and idx >= 0 and idx not in c.delivered:
            exc = self._death_error(c, reason, oom, how)
            blob = encode_batches([([idx], [None], {idx: (exc, "", proc.pid)})])
            c.delivered.add(idx)
            done = len(c.delivered) == c.count
            if done:
                self.inflight.pop(c.seq, None)
                if c in extra:
                    extra.remove(c)
            self.report(c.job, [(c, done, 0, 1)], blob)
        # everything else it held goes again, in order, to a fresh process
        again = sorted(self.inflight.values(), key=lambda x: x.seq) + extra
        self.inflight.clear()
        for x in reversed(again):
            if x.job in self.cancelled_jobs or (x.job, x.chunk) in self.stopped:
                self.fail_chunk(x, _cancelled(x.job))
            elif x.frames is None and not self.load_frames(x):
                self.fail_chunk(x, MinirayError(
                    f"job {x.job} no longer has this task's arguments in Redis (it was "
                    "cancelled or closed while the task's process died)"))
            else:
                self.pending.appendleft(x)

    def unannounced(self) -> list:
        """Chunks the dead process had claimed but not yet told us of (from ``wip``)."""
        known = {(c.job, c.chunk) for c in list(self.inflight.values()) + list(self.pending)}
        held = self.r.execute("HGETALL", self.w.keys.wip(self.w.worker_id))
        out, tag = [], f"@{self.index}"
        for i in range(0, len(held), 2):
            field, value = held[i].decode(), held[i + 1].decode()
            job, _, chunk = field.rpartition("/")
            if not value.endswith(tag) or (job, int(chunk)) in known:
                continue
            spec, bad = _spec(job, self.r.execute("HGET", self.w.keys.job(job), "spec"))
            entry = value[: -len(tag)]
            self.seq += 1
            out.append(_Chunk(job, entry, int(chunk), self.seq, None, 0,
                              Keys.parse_entry(entry)[2], None, spec, bad=bad))
        return out

    def load_frames(self, c: _Chunk) -> bool:
        """Read a chunk's payload back from Redis for a resend; False when it is gone."""
        _, nframes, _ = Keys.parse_entry(c.entry)
        fields = [Keys.payload_field(c.chunk, i) for i in range(nframes)]
        frames = self.r.execute("HMGET", self.w.keys.tasks(c.job), *fields)
        if any(f is None for f in frames):
            return False
        if c.bad is not None or not _decode(c, frames):
            return True  # (dispatch fails it)
        init = c.spec.get("init")
        return not self.w.functions_missing({c.sha} | ({init} if init else set()), self.r)

    def _death_error(self, c: _Chunk, reason, oom: bool, how: str) -> BaseException:
        where = f"on worker {self.w.name} ({self.w.host})"
        spec = c.spec
        if reason == "timeout":
            return TaskTimeoutError(
                f"task ran longer than its limit of {spec['timeout']:g} s "
                f"(Limits(timeout_seconds={spec['timeout']:g})) and was killed {where}")
        if reason == "cancel":
            return _cancelled(c.job)
        if oom or (spec.get("memory_bytes") and how == "killed by SIGKILL"):
            gb = spec["memory_bytes"] / 1024**3
            return MemoryLimitError(
                f"task used more than its memory limit of {gb:g} GB "
                f"(Limits(memory_gb={gb:g})) and was killed {where}; raise the limit or "
                "process less data per task")
        return TaskCrashedError(
            f"the process running the task {how} {where}; the worker replaced it. "
            "A segfault in a C extension or os._exit() in the task does this")

    # -- Redis commands queued for the next pipeline ------------------------------------------
    def _drain_out(self, pipe) -> None:
        out, self.out = self.out, []
        for fn, args in out:
            fn(pipe, *args)

    def _complete(self, pipe, job, chunks, msg) -> None:
        s = self.w.settings
        self.broker.complete(pipe, self.w.worker_id, job, chunks, s.result_ttl_seconds,
                             s.event_stream_maxlen, msg)


def _spec(job: str, raw) -> tuple:
    """(the job's spec, None), or ({}, the error its chunks fail with) when it is malformed."""
    try:
        return parse_spec(raw, job), None
    except MinirayError as e:
        return {}, e


def _decode(c: _Chunk, frames: list) -> bool:
    """Fill in the chunk from its payload's head; False (and ``c.bad``) when it has none."""
    try:
        head, c.frames = chunk_head(c.job, c.entry, c.chunk, frames)
    except MinirayError as e:  # another protocol version, or garbage
        c.bad = e
        return False
    c.sha, c.start, c.count = head.fn_sha, head.start, head.count
    return True


def _cancelled(job: str) -> JobCancelledError:
    return JobCancelledError(f"job {job} was cancelled while this task was running")


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
        self.slots: list[_Slot] = []
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
        self.slots = [_Slot(self, i) for i in range(self.nslots)]
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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="miniray worker", description=__doc__.split("\n")[0])
    p.add_argument("--redis", default=None, help="server URL (default: MINIRAY_REDIS_URL)")
    p.add_argument("--slots", type=int, default=1, help="tasks run at once (default 1)")
    p.add_argument("--gpus", default=None, help="GPUs this worker owns: indices as "
                   "nvidia-smi numbers them, UUIDs or PCI bus ids, e.g. 0,1 (default: those in "
                   "CUDA_VISIBLE_DEVICES, else every GPU NVML lists; 'none' for none)")
    p.add_argument("--gpu-memory", type=float, default=None, metavar="GB",
                   help="memory of each GPU, for packing tasks with Limits(gpu_memory_gb=...) "
                   "(default: NVML's total; a GPU of unknown size takes one packed task)")
    p.add_argument("--triton", action="store_true",
                   help="keep a Triton Inference Server on this node for Limits(triton=True) "
                   "tasks: start one with --triton-models, or use one at --triton-url")
    p.add_argument("--triton-models", default=None, metavar="DIR",
                   help="model repository of the tritonserver this worker starts (on loopback "
                   "ports), restarts when it dies and stops on exit; implies --triton")
    p.add_argument("--triton-lazy", action="store_true",
                   help="load no model at start (default: every model of the repository); "
                   "tasks load what they need with miniray.triton.load_model")
    p.add_argument("--triton-url", default=None, metavar="URL",
                   help="HTTP address of a Triton server already running, e.g. "
                   "http://127.0.0.1:8000; implies --triton")
    p.add_argument("--triton-grpc-url", default=None, metavar="URL",
                   help="its gRPC address, for miniray.triton.client('grpc')")
    p.add_argument("--name", default=None, help="worker name (default HOST-PID)")
    p.add_argument("--namespace", default=None, help="key prefix (default MINIRAY_NAMESPACE)")
    p.add_argument("--cpu-offset", type=int, default=0, help=argparse.SUPPRESS)
    p.add_argument("--parent-pid", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    url = args.redis or settings().redis_url
    if not url:
        p.error("give --redis URL or set MINIRAY_REDIS_URL")
    if args.parent_pid:
        _die_with_parent()
        if os.getppid() != args.parent_pid:
            return 0
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    try:
        triton = None
        if args.triton or args.triton_models or args.triton_url:
            from miniray.triton.server import TritonServer

            triton = TritonServer(models=args.triton_models, url=args.triton_url,
                                  grpc_url=args.triton_grpc_url, lazy=args.triton_lazy)
        worker = Worker(url, slots=args.slots, gpus=args.gpus, name=args.name,
                        namespace=args.namespace, cpu_offset=args.cpu_offset,
                        parent_pid=args.parent_pid, gpu_memory_gb=args.gpu_memory,
                        triton=triton)
    except MinirayError as e:
        print(f"miniray worker: {e}", file=sys.stderr)
        return 2

    signal.signal(signal.SIGTERM, worker.on_signal)
    signal.signal(signal.SIGINT, worker.on_signal)
    try:
        code = worker.run()
    except Exception:
        traceback.print_exc()
        worker.shutdown()
        return 1
    if worker.gave_up:
        print(f"miniray worker: {worker.gave_up}", file=sys.stderr)
    return code


def _die_with_parent() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except Exception:
        pass

