"""The results reader of an ``Executor``: who reads result messages, when, and the upkeep
that keeps the job alive on the server.

::

    res:{client} --BLMPOP, up to 1024 at a time--+
    inbox (this machine's task processes) -------+--> read_once() --> Delivery.deliver()
                                                        ^
        a thread in MinirayFuture.result() (read_until) | or the results thread (run)
        while nobody else reads                         | (callbacks, wait(), done(), shutdown)

    the results thread, each heartbeat: upkeep(): liveness key and job TTLs renewed, dead
    workers reaped, chunks workers took marked running, the job's state checked (abandoned,
    cancelled elsewhere, lost); when the executor is shut down and nothing is pending, or it
    is broken: the job is closed (JobLifecycle.close)

Results are read by one thread at a time (the "reader"): a caller waiting in
``MinirayFuture.result()`` while nobody else reads, or the results thread. The results
thread reads when futures are wanted without anyone reading (callbacks, ``wait()``,
``as_completed()``, ``done()``, shutdown), and once a second for results nobody has asked
for yet. This module owns the results connections, the reader's lock and who reads now;
what a message settles is ``miniray.client.delivery``'s.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from typing import TYPE_CHECKING

from miniray.broker import Broker, _redact, connect, job_ttl
from miniray.errors import ServerError, ServerLostError
from miniray.resp import Connection, NoScriptError, RedisError

from . import keep as _kept
from .futures import _WAITING, MinirayFuture

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["Results"]

_log = logging.getLogger("miniray.executor")


class Results:
    """The reading side of one ``Executor`` (``ex``): see the module's docstring."""

    def __init__(self, ex: "Executor", url: str):
        self._ex = ex
        self.rr = connect(url)  # results: BLMPOP by whichever thread reads (see read_once)
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.reader: int | None = None  # the thread that reads results now
        self.undelivered: list = []  # result messages popped and not delivered yet
        self.undelivered_direct: list = []  # the same from the inbox (delivered first)
        self.demand = False  # futures wait for the results thread to deliver (MinirayFuture)
        self.closed = False
        self.ru = None  # the results thread's, for upkeep (see run)
        self.heard = time.time()  # when the server last heard from us (see upkeep)
        self.events_seen = "0-0"  # the job's "started" events read so far (see mark_running)
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the results thread."""
        self.thread = threading.Thread(target=self.run, daemon=True,
                                       name=f"miniray-results-{self._ex.client_id}")
        self.thread.start()

    def want_delivery(self) -> None:
        with self.lock:
            if not self.demand:
                self.demand = True
                self.cond.notify()

    def wake(self) -> None:
        """End the wait of the thread reading results now, if one is (a future it may be
        waiting for was cancelled): a wake-up message it skips."""
        ex = self._ex
        if self.reader is not None and ex._broken is None:
            try:
                ex._r.send_deferred([("RPUSH", ex.keys.results(ex.client_id), b"S")])
            except RedisError:
                pass

    def poke(self) -> None:
        """Have the results thread look again (shutdown, or futures settled without it)."""
        with self.lock:
            self.cond.notify()

    def read_until(self, fut: MinirayFuture, timeout: float | None) -> float | None:
        """Read results in this thread until ``fut`` is done, while no other thread reads;
        return what is left of ``timeout`` for the wait that follows."""
        ex = self._ex
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        while fut._state in _WAITING:
            with self.lock:
                if self.reader is not None or self.closed or ex._broken is not None:
                    fut._wanted = True  # whoever reads delivers; the thread takes over
                    if not self.demand:
                        self.demand = True
                        self.cond.notify()
                    break
                self.reader = me
            try:
                wait, left = ex._settings.heartbeat_seconds, None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    wait = min(wait, left)
                    if wait <= 0:
                        break
                # the server answers a BLMPOP within ``wait``; a hung one must not keep a
                # caller with a timeout past its deadline (the reply stays owed, not lost)
                self.read_once(wait, left)
            except RedisError:  # the results thread decides whether the server is gone
                fut._want()
                break
            finally:
                with self.lock:
                    self.reader = None
                    if self.demand or ex._shutdown or ex._broken is not None:
                        self.cond.notify()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    @property
    def read_owed(self) -> bool:
        """A BLMPOP was sent whose reply nobody has read yet (the results connection sends
        nothing else)."""
        return self.rr.owed > 0

    def read_once(self, timeout: float, give_up: float | None = None) -> None:
        """One BLMPOP of result messages (waiting up to ``timeout`` s) and their delivery;
        ``give_up``: seconds after which to stop waiting for the reply (ReplyTimeout).
        Only the reader calls it; a reply left owed by an earlier reader is read first.

        Messages in the inbox end the wait early (the BLMPOP stays owed, for the next
        read), and go first: a crash report that came through Redis names the items still
        missing after the outcomes their process had sent directly."""
        ex = self._ex
        if not self.undelivered and not self.undelivered_direct:
            if not self.read_owed:  # (the connection counts what it owes: a Ctrl-C
                # between the send and any flag of ours cannot put the two out of step)
                self.rr.send_command("BLMPOP", round(max(timeout, 0.001), 3), 1,
                                     ex.keys.results(ex.client_id), "LEFT", "COUNT", 1024)
            if ex._inbox is not None and not self.rr.wait_reply_or(
                    ex._inbox.fileno(), give_up):
                got = False  # (the BLMPOP's reply stays owed)
            else:
                got = self.rr.read_reply(give_up)
            if got is not False:
                if isinstance(got, Exception):
                    raise got
                self.undelivered = list(got[1]) if got else []
                if ex._keep is not None and self.undelivered:  # stored results: read
                    self.undelivered = _kept.resolve(self.rr, ex.keys, self.undelivered)
            if ex._inbox is not None:
                self.undelivered_direct = ex._inbox.drain()
        # taken from the server or the inbox: each is delivered before the next reader reads
        # (a caller interrupted here, by Ctrl-C, leaves the rest to the next one)
        deliver = ex._delivery.deliver
        msgs = self.undelivered_direct
        while msgs:
            deliver(msgs[0], direct=True)
            del msgs[0]
        msgs = self.undelivered
        while msgs:
            deliver(msgs[0])
            del msgs[0]

    def upkeep(self, broker: Broker) -> bool:
        """Renew this client's liveness key and its job's TTLs, reap dead workers, check the
        job. False when the executor is broken."""
        ex = self._ex
        s, k, job = ex._settings, ex.keys, ex.job_id
        # the submissions' replies that came: an error among them breaks the executor (not
        # waiting for the rest, nor holding the submit connection: the server may hang)
        ex._r.read_available()
        grace = max(1, round(s.client_grace_seconds))
        pipe = broker.r.pipeline()
        # our liveness key, read before it is renewed: gone means that the cluster may have
        # given our job up (we were silent for the grace: paused, or the server was)
        pipe.command("EXISTS", k.client(ex.client_id))
        pipe.command("SET", k.client(ex.client_id), os.getpid(), "EX", grace)
        # while this executor lives its job's keys do; if it dies they expire
        ttl = job_ttl(grace if ex._keep is None else ex._keep)
        for live in (k.job(job), k.logs(job), k.events(job), k.attempts(job), k.stop(job)):
            pipe.command("EXPIRE", live, ttl)
        ex._outbox.big_args.upkeep(pipe, ttl, ex._refs)
        if ex._keep is not None:
            _kept.renew(pipe, k, job, ttl)
        broker.reap(s.worker_dead_seconds, s.max_retries, s.event_stream_maxlen,
                    s.result_ttl_seconds, pipe=pipe)
        pipe.command("HGET", k.job(job), "state")
        started = bool(ex._refs)
        if started:  # which chunks workers took: their futures are running
            pipe.command("XRANGE", k.events(job), "(" + self.events_seen, "+", "COUNT", 10000)
        replies = pipe.execute()
        now = time.time()  # (wall clock: a machine's sleep counts)
        silent, self.heard = now - self.heard, now
        state = replies[-2] if started else replies[-1]
        if started:
            self.mark_running(replies[-1])
        # (a kept job is not given up while we are silent: it runs on, see miniray.client.keep)
        if not replies[0] and ex._keep is None and (state is not None
                                                    or silent >= grace / 2):
            ex._lifecycle.abandoned(broker, job, silent)
            return True
        if ex._submit_errors:
            ex._delivery.break_executor(ServerError(
                f"the server at {_redact(ex.redis_url)} refused a submission: "
                f"{ex._submit_errors[0]}; pending futures fail. Check the server (memory, "
                "version) and start a new Executor."))
            return False
        if state == b"cancelled" and ex._refs:
            ex._lifecycle.cancelled_elsewhere()  # `miniray cancel`: no result will come
        elif state is None:
            ex._delivery.break_executor(ServerLostError(
                f"the server at {_redact(ex.redis_url)} no longer knows job {ex.job_id} (it "
                "restarted and lost its data, or someone deleted its keys); pending futures "
                "fail. Start a new Executor."))
            return False
        return True

    def mark_running(self, events: list) -> None:
        """Futures of chunks a worker took are running (``Future.running()``, and ``cancel()``
        returns False), as with ProcessPoolExecutor once a task is handed to a worker."""
        ex = self._ex
        for entry_id, fields in events:
            self.events_seen = entry_id.decode()
            if fields[1] != b"started":
                continue
            chunks = dict(zip(fields[::2], fields[1::2])).get(b"chunks")
            for chunk in chunks.split(b",") if chunks else ():
                ref = ex._refs.get(int(chunk))
                if ref is not None:
                    ref.future.set_running_or_notify_cancel_safe()
                    for item in getattr(ref.future, "_items", ()):  # (map_futures)
                        item.set_running_or_notify_cancel_safe()

    def run(self) -> None:
        """The results thread: upkeep each heartbeat, reading while nobody else does; at the
        end, the job is closed."""
        ex = self._ex
        s = ex._settings
        next_upkeep = 0.0
        lost_since = None
        # upkeep has a connection of its own: neither a reader's BLMPOP nor the submissions
        # wait for it (nor it for them)
        self.ru = Connection(ex.redis_url)
        broker = Broker(self.ru, s.namespace, load=False)
        me = threading.get_ident()
        while True:
            with self.lock:
                while True:
                    finished = ex._shutdown and not ex._refs and not ex._outbox.queue
                    if (finished or ex._broken is not None) and self.reader is None:
                        self.closed = True
                        break
                    now = time.monotonic()
                    upkeep = now >= next_upkeep
                    if not ex._refs and not ex._outbox.queue:
                        self.demand = False
                    # (a BLMPOP left owed is a reason to read, unless results also come
                    # to the inbox: then it is the usual state after a direct result)
                    if upkeep or (self.reader is None and not finished and (
                            self.demand or (self.read_owed and ex._inbox is None))):
                        break
                    self.cond.wait(next_upkeep - now)
                if self.closed:
                    break
                read = self.reader is None and (bool(ex._refs) or self.read_owed)
                if read:
                    self.reader = me
            try:
                if upkeep:
                    next_upkeep = time.monotonic() + s.heartbeat_seconds
                    if not self.upkeep(broker):
                        continue
                if read:
                    self.read_once(s.heartbeat_seconds)
                lost_since = None
            except NoScriptError:  # the server restarted and lost our scripts
                broker.load_scripts()
            except RedisError as e:
                if ex._local is not None and not ex._local.server_alive():
                    lost_since = 0.0  # our own server died: no point in waiting
                lost_since = time.monotonic() if lost_since is None else lost_since
                if time.monotonic() - lost_since > 3.0:
                    ex._delivery.break_executor(ServerLostError(
                        f"lost the server at {_redact(ex.redis_url)} with tasks pending: {e}"
                        ". The pending futures fail; start a new Executor once it is back."))
                else:
                    time.sleep(0.2)
                    next_upkeep = 0.0  # try again soon
            except BaseException:  # a done-callback's SystemExit or KeyboardInterrupt (a
                # future lets through what is not an Exception): this thread must go on
                _log.exception("a done-callback of executor %s raised", ex.job_name)
            finally:
                if read:
                    with self.lock:
                        self.reader = None
        ex._lifecycle.close()
