"""The outbox: what an ``Executor`` sends to the server, and what it takes back unsent.

::

    submit()/map() --> enqueue(): a chunk (_Ref) in Executor._refs
                          | a lone submit: sent from the caller (send_safely, inline)
                          | a burst: queue --[flusher thread]--> send_safely(batch)
                          v
    send(): one pipeline per batch: new functions (fn:{sha}), payloads (tasks:{job}),
            entries (q:{job}) and the wake-up; a big chunk alone, part by part (send_big)
    withdraw(): a chunk taken back before any worker claims it (Future.cancel, Ctrl-C)

It owns the chunks not sent yet (``queue``), the flag that lets one sender send at a time
(``flushing``: the flusher thread or a caller's inline send), the functions pickled so far
(``function``) and the big arguments stored beside their chunks (``big_args``). The chunks in
flight (``Executor._refs``) and the lock that guards them and this queue are the executor's:
the results reader and the job's lifecycle use them too.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
import weakref
from typing import TYPE_CHECKING

from miniray.broker import _redact, job_ttl
from miniray.errors import ServerLostError
from miniray.keys import Keys
from miniray.protocol import encode_chunk
from miniray.resp import NoScriptError, RedisError
from miniray.serialization import dumps_function
from miniray.values import bigvalues, payloads

from . import keep as _kept
from .outcomes import MISSING
from .outcomes import cancel_future as _cancel

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["Outbox"]

_HAND_MAX = 64 * 1024  # bytes: a lone chunk up to this size goes to a waiting slot directly


def _deref(held):
    return held() if isinstance(held, weakref.ref) else held


class _Ref:
    """Client-side state of one chunk in flight. A map chunk's future gets
    ``(values, errors)``; a submit's future gets the value or the exception."""

    __slots__ = ("chunk", "entry", "start", "count", "future", "values", "errors", "left",
                 "is_map", "frames", "sent", "sha", "big", "kept", "shm", "bigs")

    def __init__(self, chunk, start, count, future, is_map, frames, sha):
        self.chunk, self.start, self.count, self.sha = chunk, start, count, sha
        self.future, self.is_map, self.frames = future, is_map, frames
        self.entry = Keys.queue_entry(chunk, len(frames), count)
        self.values = [MISSING] * count if is_map else None
        self.errors: dict = {}
        self.left = count
        self.sent = False
        self.big = False  # stored part by part, waiting for the replies (see _send_big)
        self.kept = None  # the payload, kept until it ends to re-run a failure (see rerun.py)
        self.shm = ()  # its arguments' files in shared memory, freed when it ends (see shm)
        self.bigs = ()  # its big arguments' keys on the server (bigvalues): (key, view, part)


class Outbox:
    """The sending side of one ``Executor`` (``ex``): see the module's docstring."""

    def __init__(self, ex: "Executor"):
        self._ex = ex
        self.queue: list[_Ref] = []
        self.flushing = False  # one sender at a time: the flusher thread or an inline submit
        self.last_submit = 0.0
        self.big_args = bigvalues.ArgumentKeys()  # big arguments on the server, by chunk
        self.chunk_ids = itertools.count()
        self.functions: collections.OrderedDict = collections.OrderedDict()  # id -> (fn, sha)
        self.fn_upload: dict[str, bytes] = {}  # pickled functions not yet in Redis
        self.fn_fresh: dict[str, float] = {}  # sha -> when its TTL was last renewed
        self.thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the flusher thread."""
        self.thread = threading.Thread(target=self._flush_loop, daemon=True,
                                       name=f"miniray-flush-{self._ex.client_id}")
        self.thread.start()

    def function(self, fn, fresh: bool = False) -> str:
        """The function's content hash; it is pickled once per executor (LRU of 128), or
        again with ``fresh`` (a cached map: what travels must be what its key says).

        The cache holds functions weakly where it can: an executor must not keep a bound
        method's object (or a closure's cells) alive after its tasks are done.
        """
        lock = self._ex._lock
        with lock:
            entry = self.functions.get(id(fn))
            if not fresh and entry is not None and _deref(entry[0]) is fn:
                self.functions.move_to_end(id(fn))
                return entry[1]
        sha, data = dumps_function(fn)
        try:
            held = weakref.ref(fn)
        except TypeError:  # builtins and a few others: they live forever anyway
            held = fn
        with lock:
            self.functions[id(fn)] = (held, sha)
            while len(self.functions) > 128:
                self.functions.popitem(last=False)
            if sha not in self.fn_fresh:
                self.fn_upload[sha] = data
        return sha

    def enqueue(self, sha, start, count, frames, future, is_map) -> None:
        ex = self._ex
        mine, placed = frames, ()
        if ex._shm_args is not None and len(frames) > 1 and ex._shm_args():
            frames, placed = ex._shm.place(frames)
        size = len(frames[0]) if len(frames) == 1 else sum(map(len, frames))
        part = payloads.SMALL_PART
        bigs = ()
        if size >= payloads.BIG:  # (asks the server: only big payloads pay for it)
            payloads.check_room(ex._r, size, "arguments")
            part = payloads.big_part_size(ex._r)
            if len(frames) > 1 and not placed and ex._keep is None:  # big buffers
                # beside the chunk (bigvalues; a kept job's outlive this client: inline)
                frames, bigs = bigvalues.mark(frames, part, ex.keys, ex.job_id)
        frames = encode_chunk(sha, start, count, frames, part)
        ref = _Ref(next(self.chunk_ids), start, count, future, is_map, frames, sha)
        ref.big = size >= payloads.BIG
        ref.shm, ref.bigs = placed, bigs
        if placed or bigs:  # (a re-run here must not need the files: freed when the chunk ends)
            size = sum(map(len, mine))
        if size <= ex._settings.rerun_keep_bytes and (
                not is_map or getattr(future, "_items", None) is not None):  # (not map's)
            # (a reference: no copy, no cost)
            ref.kept = encode_chunk(sha, start, count, mine, part) if placed or bigs else frames
        future._ref = ref
        now = time.monotonic()
        with ex._lock:
            if ex._shutdown:  # (a map racing a shutdown stops here: what it queued
                # before runs, or is cancelled by cancel_futures, like every other task)
                raise RuntimeError("cannot schedule new futures after shutdown")
            ex._refs[ref.chunk] = ref
            ex._n_items += count
            wanted = future._wanted  # a callback was added before it was sent (map_futures)
            # A lone submit is sent from here (no thread hand-off on the latency path); a
            # burst queues for the flusher thread, which sends it in a few pipelines.
            inline = not self.queue and not self.flushing and now - self.last_submit > 2e-4
            self.last_submit = now
            if inline:
                self.flushing = True
            else:
                self.queue.append(ref)
                ex._wakeup.notify()
        if wanted and not ex._results.demand:  # (unlocked: with a ref pending, demand stays set)
            ex._results.want_delivery()
        if inline:
            self.send_safely([ref])

    def send_safely(self, batch: list) -> bool:
        ex = self._ex
        try:
            for i in range(0, len(batch), 4096):
                self._send(batch[i : i + 4096])
            return True
        except RedisError as e:
            ex._delivery.break_executor(ServerLostError(
                f"lost the server at {_redact(ex.redis_url)} while submitting: {e}"))
            return False
        except BaseException:  # Ctrl-C in an inline send (the caller's own thread)
            self._forget_unsent(batch)
            raise
        finally:
            with ex._lock:
                self.flushing = False
                if self.queue or ex._shutdown:  # else the flusher has nothing to do:
                    ex._wakeup.notify_all()  # waking it would only take the GIL from us

    def _forget_unsent(self, batch: list) -> None:
        """A send cut short by Ctrl-C: only a caller's inline send (submit, map) is, and its
        futures never reach it (the KeyboardInterrupt does). What of it reached the server
        is unknown (the connection was closed: see resp), so they are cancelled here and
        nothing, shutdown included, waits for them; a chunk that did arrive runs and its
        result is ignored. No round trip: the user may press Ctrl-C because the server
        hangs, and the interrupt must come back at once."""
        ex = self._ex
        with ex._lock:
            for ref in batch:
                ex._refs.pop(ref.chunk, None)
        for ref in batch:
            _cancel(ref.future)

    def _flush_loop(self) -> None:
        ex = self._ex
        while True:
            with ex._lock:
                while (not self.queue or self.flushing) and not ex._shutdown:
                    ex._wakeup.wait()
                while self.flushing:  # shutting down: let an inline send finish first
                    ex._wakeup.wait()
                if not self.queue:
                    return  # shut down and nothing left to send
                batch, self.queue = self.queue, []
                self.flushing = True
            sent = self.send_safely(batch)
            # (not held while this thread waits: its refs hold their futures, and so the
            # results, which the user may have dropped long since)
            batch = None
            if not sent:
                return

    def _send(self, batch: list) -> None:
        ex = self._ex
        s, k, job = ex._settings, ex.keys, ex.job_id
        pipe = ex._r.pipeline()
        now = time.monotonic()
        with ex._lock:
            upload, self.fn_upload = self.fn_upload, {}
        for sha, data in upload.items():
            pipe.command("SET", k.fn(sha), data, "EX", s.function_ttl_seconds)
            self.fn_fresh[sha] = now
        for sha in {ref.sha for ref in batch}:  # renew what is in use, at most hourly
            if now - self.fn_fresh.get(sha, now) > 3600:
                pipe.command("EXPIRE", k.fn(sha), s.function_ttl_seconds)
                self.fn_fresh[sha] = now
        live = [ref for ref in batch if not ref.future.cancelled()]
        big = [ref for ref in live if ref.big]
        if big:
            live = [ref for ref in live if not ref.big]
        if len(live) == 1 and len(live[0].frames) == 1 and len(live[0].frames[0]) <= _HAND_MAX:
            # a lone small chunk (a submit): one script stores it and hands it straight to
            # the slot that went idle last, if one waits (no claim to look for it)
            ref = live[0]
            ex._broker.publish_one(pipe, job, ex.priority, ref.entry, ref.frames[0],
                                   s.event_stream_maxlen)
        elif live:
            fields, entries, n_items = [], [], 0
            for ref in live:
                for i, frame in enumerate(ref.frames):
                    fields += (Keys.payload_field(ref.chunk, i), frame)
                entries.append(ref.entry)
                n_items += ref.count
            pipe.command("HSET", k.tasks(job), *fields)
            pipe.command("RPUSH", k.queue(job), *entries)
            ex._broker.publish(pipe, job, ex.priority, len(entries), n_items,
                               s.event_stream_maxlen)
        if ex._keep is not None:  # where each chunk's items go, for attachers
            _kept.index(pipe, k, job, live)
        for ref in live:
            ref.sent = True
            ref.frames = None  # the payload lives in Redis now
        pipe.send_deferred()
        for ref in big:
            self._send_big(ref)

    def _send_big(self, ref: _Ref) -> None:
        """Store and publish one big chunk, waiting for the replies: a server that cannot
        hold it (maxmemory) fails this chunk's future, not the executor. Each part is a
        command of its own (a transaction would hold them all at once, and a server closes
        a client whose queued transaction passes client-query-buffer-limit, 1 GB by
        default); the chunk is queued once every part is stored, and a refused chunk's
        parts are deleted again."""
        ex = self._ex
        s, k, job = ex._settings, ex.keys, ex.job_id
        size = sum(map(len, ref.frames)) + sum(view.nbytes for _, view, _ in ref.bigs)
        names = [Keys.payload_field(ref.chunk, i) for i in range(len(ref.frames))]
        refused = None
        if ref.bigs:  # its big buffers first, each beside the chunk (miniray.values.bigvalues)
            refused = self.big_args.store(ex._r, ref.chunk, ref.bigs,
                                          job_ttl(s.client_grace_seconds))
        if refused is None:
            pipe = ex._r.pipeline()
            for name, frame in zip(names, ref.frames):
                pipe.command("HSET", k.tasks(job), name, frame)
            replies = pipe.execute(raise_on_error=False)
            refused = next((r for r in replies if isinstance(r, RedisError)), None)
        ref.frames = None
        if refused is None:
            pipe = ex._r.pipeline()
            if ex._keep is not None:
                _kept.index(pipe, k, job, [ref])
            pipe.command("RPUSH", k.queue(job), ref.entry)
            ex._broker.publish(pipe, job, ex.priority, 1, ref.count, s.event_stream_maxlen)
            replies = pipe.execute(raise_on_error=False)
            refused = next((r for r in replies[:len(replies) - 1]
                            if isinstance(r, RedisError)), None)
        if refused is not None:
            try:
                ex._r.execute("HDEL", k.tasks(job), *names)
            except RedisError:
                pass  # (they go with the job)
            with ex._lock:
                ex._refs.pop(ref.chunk, None)
                ex._tally[1] += ref.count
            self.free(ref)
            try:
                ref.future.set_exception(payloads.refused(size, "task's arguments", refused))
            except Exception:  # cancelled meanwhile
                pass
            return
        ref.sent = True
        if isinstance(replies[-1], NoScriptError):  # stored and queued; its wake-up is owed
            ex._broker.load_scripts()
            ex._broker.publish(None, job, ex.priority, 1, ref.count,
                               s.event_stream_maxlen)

    def withdraw(self, ref: _Ref) -> bool:
        """Take a chunk back before any worker claims it; False if one already has."""
        ex = self._ex
        with ex._lock:
            if not ref.sent:
                if ref in self.queue:
                    self.queue.remove(ref)
                ex._refs.pop(ref.chunk, None)
                self.free(ref)
                return True
        try:
            removed = ex._broker.cancel_chunk(ex.job_id, ref.entry)
        except RedisError:
            return False
        if removed:
            with ex._lock:
                ex._refs.pop(ref.chunk, None)
            self.free(ref)
        return removed

    def free(self, ref: _Ref, reuse: bool = False) -> None:
        """Unlink a chunk's arguments in shared memory, and its big ones on the server (see
        bigvalues): it has ended, or never will run (a task process that mapped them keeps
        its mapping); ``reuse``: it ended with all its results, its shared-memory files may
        be written again (``Segments.free``)."""
        if ref.shm:
            paths, ref.shm = ref.shm, ()
            self._ex._shm.free(paths, reuse)
        if ref.bigs:  # on the server: deleted by the next upkeep (no round trip here)
            ref.bigs = ()
            self.big_args.end(ref.chunk)
