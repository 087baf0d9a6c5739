"""``miniray.attach(job_id)``: follow a kept job (``Executor(keep=True)``, ``%%miniray map
--bg``) from any process connected to its cluster, its owner alive or not.

A :class:`JobHandle` reads the job's stored results (``out:{job}``, see ``miniray.client.keep``)
without taking them from the owner or other attachers, and places each item by ``idx:{job}``.
One background thread follows the stream (``XREAD BLOCK``, bounded waits) and, about once a
second, the job's state: when the job ends (done, cancelled, given up, expired) or the server
is lost for ``_LOST_SECONDS``, every item future not settled yet gets its outcome, so no
future of a handle ever hangs.
"""

from __future__ import annotations

import json
import pickle
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FuturesTimeout

from miniray.broker import Broker, _redact, connect
from miniray.config import settings
from miniray.errors import (
    JobAbandonedError,
    JobCancelledError,
    JobNotFoundError,
    JobNotKeptError,
    MinirayError,
    ServerLostError,
    WorkerLostError,
)
from miniray.protocol import LostChunk, decode_batches, decode_message
from miniray.resp import Connection, RedisError

from . import observe
from .keep import CACHED_PREFIX, assemble, parts_of
from .outcomes import force_cancel

__all__ = ["JobHandle", "attach"]

_POLL_SECONDS = 1.0  # the longest XREAD BLOCK, and how often the job's state is read
_REPLY_SECONDS = 5.0  # a server that answers nothing this long counts as unreachable
_LOST_SECONDS = 10.0  # unreachable this long: the server is lost, pending futures fail
_ENDED = ("done", "cancelled", "orphaned", "closing")


def attach(job_id: str, redis_url: str | None = None) -> "JobHandle":
    """A handle on the kept job ``job_id`` (its owner alive or not).

    >>> h = miniray.attach("1a2b3c4d5e6f.0")       # doctest: +SKIP
    >>> h.progress()["done"], h.result(timeout=600)  # doctest: +SKIP

    ``redis_url``: the cluster (default ``MINIRAY_REDIS_URL``, else this process's local
    cluster). Raises ``JobNotFoundError`` for an id the cluster does not know and
    ``JobNotKeptError`` for a job that was not kept (its results went to its owner only).
    """
    return JobHandle(job_id, redis_url)


class ItemFuture(Future):
    """One item's future; ``worker``/``host``/``slot`` once its result came (the timings,
    ``started_at``/``finished_at``, are not stored for attachers: None)."""

    cached = False  # it came from the item cache (a kept cached map's: see miniray.client.keep)

    def __init__(self):
        super().__init__()
        self.worker = self.host = self.slot = None
        self.started_at = self.finished_at = None


def _d(v):
    return v.decode() if isinstance(v, bytes) else v


class JobHandle:
    """A kept job seen from outside its owner: ordered results, progress, cancel.

    ``futures``: one ``concurrent.futures.Future`` per item (in task order), each settling
    with the item's result or exception; when the job is cancelled they are cancelled, when
    it is given up, expires or the server is lost they fail (``JobAbandonedError``,
    ``ServerLostError``), and an item whose result never came (its worker was lost) fails
    with ``WorkerLostError``.
    """

    def __init__(self, job_id: str, redis_url: str | None = None):
        s = settings()
        url = redis_url or s.redis_url
        if url is None:
            from miniray.cluster.local import get_local_cluster

            url = get_local_cluster().url
        self.redis_url = url
        self.job_id = self.job = job_id
        self._r = connect(url)
        self._broker = Broker(self._r, s.namespace)
        self.keys = k = self._broker.keys
        raw = {_d(a): _d(b) for a, b in zip(*[iter(self._r.execute("HGETALL", k.job(job_id))
                                                   or [])] * 2)}
        if not raw:
            self._r.close()
            raise JobNotFoundError(
                f"no job {job_id!r} on the cluster at {_redact(url)}: it never existed here, "
                "or it ended long ago and was forgotten. `%miniray jobs` (or `miniray jobs`) "
                "lists the jobs it knows; check the id and the cluster (MINIRAY_NAMESPACE).")
        if not raw.get("keep"):
            self._r.close()
            raise JobNotKeptError(
                f"job {job_id!r} was not kept: its results went to its owner only, so nobody "
                "can attach to it. Start jobs to attach to with Executor(..., keep=True) or "
                "`%%miniray map ... --bg`.")
        if raw.get("state") == "done" and not self._r.execute("EXISTS", k.index(job_id)):
            self._r.close()
            raise JobNotKeptError(
                f"job {job_id!r} has ended and its results are no longer stored: its owner "
                "collected them, someone released them, or its keep grace "
                "(MINIRAY_KEEP_GRACE_SECONDS) ended.")
        self.job_name = self.name = raw.get("name", job_id)
        self._lock = threading.Lock()
        self._futures: dict[int, ItemFuture] = {}  # task id -> future
        self._chunks: dict[int, tuple] = {}  # chunk id -> (start, count)
        # cached maps (miniray.client.keep): first task id -> (items, {position: future}, task ids)
        self._records: dict[int, tuple] = {}
        self._base: int | None = None  # the job's first task id
        self._sealed = False
        self._total: int | None = None
        self._state = raw.get("state")
        self._stopped = threading.Event()
        self._ended = threading.Event()  # every future settled
        self._load_index(self._r)
        self._thread = threading.Thread(target=self._follow, daemon=True,
                                        name=f"miniray-attach-{job_id}")
        self._thread.start()

    def __repr__(self) -> str:
        return (f"<miniray.JobHandle job={self.job_id!r} name={self.name!r} "
                f"{'ended' if self._ended.is_set() else 'following'}>")

    # -- the handle ----------------------------------------------------------------------------
    @property
    def futures(self) -> list:
        """The items' futures in task order (the items submitted so far: all of them once the
        job is sealed)."""
        with self._lock:
            if not self._records:
                return [self._futures[t] for t in sorted(self._futures)]
            # a cached map's items in their places (see miniray.client.keep): its record's key is
            # its first task id, and a later task's id is at least that
            placed, keyed = set(), []
            for first, (n, hits, tasks) in self._records.items():
                rest = iter(tasks)
                for pos in range(n):
                    if pos in hits:
                        keyed.append(((first, 0, pos), hits[pos]))
                    else:
                        t = next(rest)
                        placed.add(t)
                        keyed.append(((first, 0, pos), self._futures.setdefault(t, ItemFuture())))
            keyed += [((t, 1, 0), f) for t, f in self._futures.items() if t not in placed]
            keyed.sort(key=lambda kv: kv[0])
            return [f for _, f in keyed]

    def done(self) -> bool:
        """True once every item has its outcome (the job has ended)."""
        return self._ended.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait until every item has its outcome (or ``timeout`` s); True when it has."""
        return self._ended.wait(timeout)

    def result(self, timeout: float | None = None) -> list:
        """Wait, then the results in item order; raises the first failed item's exception
        (as ``%%miniray map`` does), ``CancelledError`` if the job was cancelled, and
        ``TimeoutError`` when ``timeout`` passes first. ``results()`` never raises."""
        if not self.wait(timeout):
            raise FuturesTimeout(f"job {self.job_id} still running after {timeout}s")
        out = []
        for f in self.futures:
            out.append(f.result(0))  # (raises the item's error, or CancelledError)
        return out

    def results(self, missing=None, timeout: float | None = None) -> list:
        """Wait (at most ``timeout`` s), then the results in item order, ``missing`` for
        items that failed, were cancelled or have no outcome yet."""
        self.wait(timeout)
        out = []
        for f in self.futures:
            ok = f.done() and not f.cancelled() and f.exception(0) is None
            out.append(f.result(0) if ok else missing)
        return out

    @property
    def errors(self) -> dict:
        """``{item index: exception}`` of the items that failed."""
        return {i: f.exception(0) for i, f in enumerate(self.futures)
                if f.done() and not f.cancelled() and f.exception(0) is not None}

    def progress(self) -> dict:
        """The job's counters on the cluster (see ``miniray.client.observe.job_progress``)."""
        return observe.job_progress(self._r, self.keys, self.job_id)

    def cancel(self) -> int:
        """Cancel the job (as ``miniray cancel`` does): queued items are dropped, running ones
        interrupted; the futures not settled are cancelled. Returns the chunks dropped."""
        n = len(self._broker.cancel_job(self.job_id, "cancelled",
                                        settings().event_stream_maxlen))
        self._ended.wait(_POLL_SECONDS * 3)  # (the follower settles them at once)
        return n

    def release(self) -> None:
        """Free the job's stored results on the cluster now (other attachers lose them)."""
        k = self.keys
        self._r.execute("DEL", k.out(self.job_id), k.index(self.job_id))

    def close(self) -> None:
        """Stop following (futures not settled yet stay as they are) and close connections."""
        self._stopped.set()
        self._thread.join(_REPLY_SECONDS + _POLL_SECONDS)
        try:
            self._r.close()
        except Exception:
            pass

    # what jupyter_ext's live view asks of its source (an Executor's face)
    def logs(self, follow: bool = False, timeout: float | None = None, since: str = "0-0"):
        """Iterate the job's captured log lines (``miniray.LogLine``), following them until it
        ends with ``follow``."""
        conn = connect(self.redis_url)
        try:
            yield from observe.iter_logs(conn, self.keys, self.job_id, follow=follow,
                                         timeout=timeout, since=since,
                                         stop=lambda: self._ended.is_set()
                                         or self._stopped.is_set())
        finally:
            conn.close()

    def workers(self) -> list:
        return observe.list_workers(self._r, self.keys)

    def shutdown(self, wait: bool = True, **_) -> None:
        """Stop following once the job has ended (the job itself goes on)."""
        if wait:
            self.close()

    # -- following -----------------------------------------------------------------------------
    def _load_index(self, conn) -> None:
        self._load_index_raw(conn.execute("HGETALL", self.keys.index(self.job_id)) or [], conn)

    def _follow(self) -> None:
        conn = Connection(self.redis_url)
        last, lost_since, next_state = "0-0", None, 0.0
        try:
            while not self._stopped.is_set():
                try:
                    if conn.owed == 0:
                        conn.send_command("XREAD", "COUNT", 256, "BLOCK",
                                          int(_POLL_SECONDS * 1000), "STREAMS",
                                          self.keys.out(self.job_id), last)
                    got = conn.read_reply(_REPLY_SECONDS)
                    if isinstance(got, Exception):
                        raise got
                    for entry_id, fields in (got[0][1] if got else ()):
                        last = _d(entry_id)
                        self._deliver(conn, parts_of(fields))
                    if time.monotonic() >= next_state:
                        next_state = time.monotonic() + _POLL_SECONDS
                        if self._check_state(conn, last):
                            return
                    lost_since = None
                except RedisError as e:
                    conn.close()  # (a reply left owed is dropped with the connection)
                    lost_since = lost_since or time.monotonic()
                    if time.monotonic() - lost_since > _LOST_SECONDS:
                        self._settle_rest(ServerLostError(
                            f"lost the server at {_redact(self.redis_url)} while following job "
                            f"{self.job_id}: {e}. The job may still run there; attach again "
                            "once the server is back."))
                        return
                    self._stopped.wait(0.5)
        finally:
            conn.close()

    def _ask(self, conn, *commands) -> list:
        """Commands on the follower's connection, each reply waited for at most
        ``_REPLY_SECONDS`` (a server that hangs must not hang the follower)."""
        conn.send_deferred(list(commands))
        return [conn.read_reply(_REPLY_SECONDS) for _ in commands]

    def _check_state(self, conn, last: str) -> bool:
        """Read the job's state; when it has ended, deliver what is left in the stream and
        settle every other future. True when the handle is done following."""
        k = self.keys
        state, sealed, total = self._ask(conn, ("HMGET", k.job(self.job_id), "state",
                                                "sealed", "total"))[0]
        state = _d(state)
        if sealed == b"1" and not self._sealed:
            self._sealed, self._total = True, int(total or 0)
        if not self._sealed or len(self._futures) < (self._total or 0) or state in _ENDED:
            raw = self._ask(conn, ("HGETALL", k.index(self.job_id)))[0]
            if raw:
                self._load_index_raw(raw, conn)
        if state is None:
            self._settle_rest(JobAbandonedError(
                f"job {self.job_id} expired on the cluster (its keep grace, "
                "MINIRAY_KEEP_GRACE_SECONDS, ended, or its keys were deleted) before these "
                "items had results"))
            return True
        if state not in _ENDED:
            return False
        while True:  # every result it stored came before its end: read them all
            got = self._ask(conn, ("XRANGE", k.out(self.job_id), "(" + last, "+",
                                   "COUNT", 256))[0]
            if not got:
                break
            for entry_id, fields in got:
                last = _d(entry_id)
                self._deliver(conn, parts_of(fields))
        if state == "done":  # collected: the idle stop of a persistent cluster need not
            job = k.job(self.job_id)  # wait for anyone else (see persistent_service)
            if self._ask(conn, ("EXISTS", job))[0]:  # (never a hash without its TTL)
                self._ask(conn, ("HSET", job, "collected", repr(time.time())))
        if state == "cancelled":
            self._settle_rest(None)
        elif state == "orphaned":
            self._settle_rest(JobAbandonedError(
                f"job {self.job_id} was given up by the cluster before these items had "
                "results"))
        else:
            self._settle_rest(WorkerLostError(
                f"job {self.job_id} ended without a result for this item (its worker was lost "
                "and its retries were used up, or its owner shut down with cancel_futures)"))
        return True

    def _load_index_raw(self, raw, conn=None) -> None:
        records = []
        with self._lock:
            for chunk, where in zip(raw[::2], raw[1::2]):
                if chunk.startswith(CACHED_PREFIX.encode()):
                    first = int(chunk[len(CACHED_PREFIX):])
                    if first not in self._records:
                        records.append((first, json.loads(where)))
                    continue
                if int(chunk) in self._chunks:
                    continue
                start, count = (int(x) for x in where.split(b":"))
                self._chunks[int(chunk)] = (start, count)
                for t in range(start, start + count):
                    self._futures.setdefault(t, ItemFuture())
            if self._futures:
                self._base = min(self._futures)
        for first, record in records:
            self._add_cached(conn or self._r, first, record)

    def _add_cached(self, conn, first: int, record: dict) -> None:
        """A cached map's record (see ``miniray.client.keep``): its cached items' futures, settled
        with the values the item cache holds (read now, in one round trip)."""
        hits = {int(pos): member for pos, member in record["hits"].items()}
        futures = {}
        order = sorted(hits)
        values = self._ask(conn, ("MGET", *[self.keys.cache(*hits[p].split(":", 1))
                                            for p in order]))[0] if order else []
        for pos, data in zip(order, values):
            f = futures[pos] = ItemFuture()
            f.cached = True
            if data is None:
                f.set_exception(MinirayError(
                    f"item {pos} of a cached map of job {self.job_id} came from the item "
                    "cache, and its result is no longer there (evicted or expired: "
                    "MINIRAY_CACHE_MAX_BYTES, MINIRAY_CACHE_TTL_SECONDS); run the map again"))
                continue
            try:
                f.set_result(pickle.loads(data))
            except Exception as e:
                f.set_exception(e)
        with self._lock:
            self._records.setdefault(first, (int(record["n"]), futures, list(record["tasks"])))

    def _deliver(self, conn, parts: list) -> None:
        from .delivery import _decorate  # (the executor's own decoration of remote errors)

        msg = assemble(parts)
        if msg is None:
            return
        decoded = decode_message(msg)
        if isinstance(decoded, LostChunk):
            return
        header, blob = decoded
        if any(c not in self._chunks for c, _ in header.chunks):
            raw = self._ask(conn, ("HGETALL", self.keys.index(self.job_id)))[0]
            self._load_index_raw(raw or [], conn)
        starts = [self._chunks.get(c, (None, 0))[0] for c, _ in header.chunks]
        if isinstance(blob, Exception):
            batches = [(None, [], {-1: (blob, "", header.pid)}, None)] * len(starts)
        else:
            batches = decode_batches(blob, header.host, starts)
        for (chunk, _), start, (indices, values, errors, _t) in zip(header.chunks, starts,
                                                                   batches):
            if start is None:
                continue
            count = self._chunks[chunk][1]
            if -1 in errors:  # one error for every item of the chunk not settled yet
                err = errors.pop(-1)
                for i in range(count):
                    if not self._futures[start + i].done():
                        errors[i] = err
                indices, values = list(errors), [None] * len(errors)
            positions = (range(len(values)) if indices is None else indices)
            for i, value in zip(positions, values):
                fut = self._futures.get(start + i)
                if fut is None or fut.done():
                    continue  # (a rerun's duplicate)
                fut.worker, fut.host, fut.slot = header.worker, header.host, header.slot
                try:
                    if i in errors:
                        exc, tb, pid = errors[i]
                        fut.set_exception(_decorate(exc, tb, start + i, self.job_id,
                                                    header.worker, header.host,
                                                    pid or header.pid))
                    else:
                        fut.set_result(value)
                except Exception:
                    pass

    def _settle_rest(self, err: BaseException | None) -> None:
        """Every future not settled yet: cancelled (``err`` None) or failed with ``err``."""
        for fut in self.futures:
            if fut.done():
                continue
            try:
                if err is None or isinstance(err, JobCancelledError):
                    force_cancel(fut)
                else:
                    fut.set_exception(err)
            except Exception:
                pass
        self._ended.set()

