"""The job's lifecycle, for an ``Executor``: all its tasks form one job on the server.

::

    Executor() --> create() --> job {client}.0 (its spec, its counters, this client's
                                liveness key)
    cancel() / `miniray cancel` --> cancel_pending(): futures cancelled, counters = the tally
    the next submission after a cancel --> renew(): job {client}.1, ...
    the cluster gave the job up (silence) --> abandoned(): futures fail, a new job goes on
    seal() (a kept job): the server ends it once it has every item
    shutdown(cancel_futures=True) --> tell_server(): the queue dropped (cancel_queued)
    the results thread's end --> close(): counters, state "done", TTLs, connections closed

The job's state stays the executor's (``job_id``, its tally of done and failed items,
``_n_items``, ``_job_cancelled``): the outbox and the results reader read and count it too.
This module owns how many jobs this executor has made, and every step that changes the job.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from miniray.errors import JobAbandonedError
from miniray.protocol import Assembler
from miniray.resp import RedisError

from . import keep as _kept
from .outcomes import cancel_future as _cancel
from .outcomes import cancel_ref as _cancel_ref

if TYPE_CHECKING:
    from miniray.broker import Broker

    from .executor import Executor

__all__ = ["JobLifecycle"]

_log = logging.getLogger("miniray.executor")


class JobLifecycle:
    """Creates, renews, seals, cancels and closes the job of one ``Executor`` (``ex``)."""

    def __init__(self, ex: "Executor"):
        self._ex = ex
        self.made = 0  # a job given up during a long pause is followed by a new one

    def create(self, pipe=None) -> None:
        """Create ``ex.job_id`` on the server (in ``pipe`` when given, else at once)."""
        ex = self._ex
        lim = ex.limits
        spec = {"timeout": lim.timeout_seconds, "memory_bytes": lim.memory_bytes,
                "cpus": lim.cpus, "gpus": lim.gpus, "gpu_mem": lim.gpu_memory_mb,
                "keep_children": lim.keep_children,
                "triton": lim.triton, "env": ex.env, "init": ex._init_sha}
        if ex._inbox is not None:
            spec["inbox"] = ex._inbox.address
        if ex._shm is not None:
            spec["shm"], spec["shm_min"] = ex._shm.address, ex._shm.min_bytes
        if ex._keep is None:  # big result buffers beside their message (miniray.values.bigvalues)
            spec["big"] = 1
        own = pipe is None
        if own:
            pipe = ex._r.pipeline()
        grace = ex._settings.client_grace_seconds
        pipe.command("SET", ex.keys.client(ex.client_id), os.getpid(), "EX",
                     max(1, round(grace)))
        ex._broker.create_job(pipe, ex.job_id, ex.client_id, ex.job_name,
                              ex.priority, spec, lim.requirement_fields(), time.time(),
                              grace, keep=ex._keep)
        if own:
            pipe.execute()

    def seal(self, timeout: float) -> None:
        """No more work for this (kept) job: see ``Executor.seal``."""
        ex = self._ex
        if ex._keep is None:
            raise RuntimeError("seal() is for kept executors (Executor(keep=True))")
        deadline = time.monotonic() + timeout
        with ex._lock:
            ex._sealed = True
            while (ex._outbox.queue or ex._outbox.flushing) and ex._broken is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"seal(): the submissions of job {ex.job_id} were "
                                       f"not all sent in {timeout:.0f} s; is the server slow?")
                ex._wakeup.wait(min(left, 0.1))
            job, total = ex.job_id, ex._n_items
        if ex._broken is None and not ex._job_cancelled:
            ex._broker.seal(job, total, ex._settings.event_stream_maxlen)

    def renew(self) -> None:
        """After a cancel, new work goes to a new job (a cancelled job takes no more tasks);
        until then ``progress()`` keeps showing the cancelled one."""
        ex = self._ex
        with ex._lock:
            if not ex._job_cancelled:
                return
            # (a send to the old job lands first; a hung one is not waited)
            deadline = time.monotonic() + 5.0
            while ex._outbox.flushing and time.monotonic() < deadline:
                ex._wakeup.wait(0.1)
            ex._job_cancelled = False
            ex._tally, ex._n_items = [0, 0], 0
            self.made += 1
            ex.job_id = f"{ex.client_id}.{self.made}"
            ex._results.events_seen = "0-0"
        self.create()

    def abandoned(self, broker: "Broker", job: str, silent: float) -> None:
        """The cluster gave our job up (or is about to: our liveness key expired) while it
        heard nothing from us. What was pending fails with a clear error; the executor goes
        on with a new job."""
        ex = self._ex
        grace = ex._settings.client_grace_seconds
        with ex._lock:
            while ex._outbox.flushing:  # (a send to the old job must land before it is closed)
                ex._wakeup.wait(0.1)
            refs = list(ex._refs.values())
            ex._refs.clear()
            ex._outbox.queue.clear()
            self.made += 1
            ex.job_id = f"{ex.client_id}.{self.made}"
            ex._results.events_seen = "0-0"
            ex._tally, ex._n_items = [0, 0], 0
        pipe = broker.r.pipeline()
        broker.cancel_job(job, "orphaned", ex._settings.event_stream_maxlen, pipe=pipe)
        pipe.command("DEL", ex.keys.results(ex.client_id))
        self.create(pipe)
        pipe.execute()
        ex._delivery.parts = Assembler()  # (a big message cut short by that DEL is not waited for)
        _log.warning("executor %s: the cluster gave job %s up after %.0f s of silence; %d "
                     "pending task(s) fail", ex.job_name, job, silent, len(refs))
        err = JobAbandonedError(
            f"the cluster gave job {job} up: it heard nothing from this executor for "
            f"{silent:.0f} s, longer than its grace of {grace:.0f} s "
            "(MINIRAY_CLIENT_GRACE_SECONDS). Was this process paused (a laptop asleep, a "
            "debugger)? Its queued tasks and unread results were dropped; submit them again "
            "(this executor goes on with a new job), or raise the grace.")
        for ref in refs:
            try:
                ref.future.set_exception(err)
            except Exception:  # (settled meanwhile: cancelled, or a result came first)
                pass

    def tell_server(self, first: bool, cancel_futures: bool) -> None:
        """``shutdown``'s word to the server: the results thread is woken; with
        ``cancel_futures`` the job's queue is dropped."""
        ex = self._ex
        if first and ex._broken is None:
            try:  # wake the results thread so it can notice
                ex._r.execute("RPUSH", ex.keys.results(ex.client_id), b"S")
            except RedisError:
                pass
        if cancel_futures:
            self._cancel_queued()

    def _cancel_queued(self) -> None:
        ex = self._ex
        with ex._lock:
            local = [r for r in ex._outbox.queue]
            ex._outbox.queue.clear()
            for r in local:
                ex._refs.pop(r.chunk, None)
            # a batch being sent now must land before the job is closed: its entries would
            # be pushed after the cancel, into a queue nobody claims from, and never settle
            # (the send only writes to the socket: short, unless the server hangs; then its
            # chunks are not cancelled, and run once it answers again)
            deadline = time.monotonic() + 5.0
            while ex._outbox.flushing and ex._broken is None and time.monotonic() < deadline:
                ex._wakeup.wait(0.1)
        entries = []
        if ex._broken is None:
            try:
                entries = set(ex._broker.cancel_job(ex.job_id, "closing",
                                                    ex._settings.event_stream_maxlen))
            except RedisError:
                entries = set()
        with ex._lock:
            dropped = [r for r in ex._refs.values() if r.entry in entries]
            for r in dropped:
                ex._refs.pop(r.chunk, None)
            ex._wakeup.notify_all()
        ex._results.poke()
        for r in local + dropped:
            _cancel(r.future)

    def cancel(self) -> int:
        """Cancel the whole job now: see ``Executor.cancel``."""
        ex = self._ex
        with ex._lock:
            ex._job_cancelled = True
            ex._outbox.queue.clear()  # nothing more is sent; a batch being sent lands first
            deadline = time.monotonic() + 5.0
            while ex._outbox.flushing and ex._broken is None and time.monotonic() < deadline:
                ex._wakeup.wait(0.1)
        try:
            ex._broker.cancel_job(ex.job_id, "cancelled", ex._settings.event_stream_maxlen)
        except RedisError:
            pass
        return self.cancel_pending()

    def cancelled_elsewhere(self) -> None:
        """The job was cancelled by someone else (``miniray cancel``): cancel its futures."""
        self.cancel_pending()

    def cancel_pending(self) -> int:
        """Every future not settled yet ends cancelled (after the job was cancelled on the
        server: no outcome is counted there after that); then the job's counters are set to
        this client's tally, which every reader (``progress()``, ``miniray status``) shows."""
        ex = self._ex
        ex._stop_feeding(f"job {ex.job_id} was cancelled")
        with ex._lock:
            ex._job_cancelled = True
            refs = list(ex._refs.values())
            ex._outbox.queue.clear()
            ex._refs.clear()
            ex._wakeup.notify_all()
        ex._results.poke()
        ex._results.wake()
        # a reader delivering a message now finishes it first (it holds refs it looked up)
        deadline = time.monotonic() + 2.0
        while (ex._results.reader not in (None, threading.get_ident())
               and time.monotonic() < deadline):
            time.sleep(0.005)
        for r in refs:
            ex._outbox.free(r)
            _cancel_ref(r)
        if ex._broken is None:
            try:
                pipe = ex._r.pipeline()
                pipe.command("HSET", ex.keys.job(ex.job_id), *self.final_counts())
                pipe.execute()
            except RedisError:
                pass
        return len(refs)

    def final_counts(self) -> list:
        """The job's counters as this client's futures say, for HSET: every item submitted
        has ended (done, failed, or else cancelled)."""
        ex = self._ex
        done, failed = ex._tally
        total = ex._n_items
        return ["done", done, "failed", failed, "cancelled", max(0, total - done - failed),
                "running", 0, "queued", 0]

    def close(self) -> None:
        """The results thread's last step: the job ends (``done``, unless it was cancelled
        or the executor broke), its keys expire, and the connections, the inbox and the
        shared memory are closed."""
        ex = self._ex
        s, k, job = ex._settings, ex.keys, ex.job_id
        try:
            pipe = ex._r.pipeline()
            # a cancelled job stays "cancelled", with the counters cancel() wrote
            if ex._broken is None and not ex._job_cancelled:
                ex._delivery.await_reports()  # marked done after its last outcome has landed
                # every item has ended: the counters say what the futures say (see
                # final_counts)
                pipe.command("HSET", k.job(job), *self.final_counts(), "state", "done",
                             "finished", repr(time.time()))
                if ex._keep is not None:  # we collected every result
                    _kept.linger(pipe, k, job)
            for key in (k.job(job), k.logs(job), k.events(job), k.attempts(job), k.stop(job)):
                pipe.command("EXPIRE", key, s.result_ttl_seconds)
            pipe.command("DEL", k.queue(job), k.tasks(job), k.client(ex.client_id),
                         k.results(ex.client_id))
            pipe.command("ZREM", k.jobs, job)
            ex._outbox.big_args.upkeep(pipe, 1, ())  # (what is left: arguments of cancelled tasks)
            pipe.execute()
        except RedisError:
            pass
        for c in (ex._r, ex._results.rr, ex._results.ru):
            try:
                c.close()
            except Exception:
                pass
        if ex._inbox is not None:  # (no reader is left: Results.closed is set)
            ex._inbox.close()
        if ex._shm is not None:  # what is left: arguments of cancelled tasks, results unread
            ex._shm.close()
