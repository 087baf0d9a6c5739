"""``miniray.Executor``: a ``concurrent.futures.Executor`` whose tasks run on miniray workers.

::

    submit()/map() --> outbox --[flusher thread: one pipeline per batch]--> tasks:{job}, q:{job}
                                                                              | workers claim
    futures <-- [reader: BLMPOP res:{client}, many at a time] <-------------- res:{client}
            <-- [the same reader: this machine's task processes, past the server] <- inbox

``submit`` pickles at once (so a bad argument fails in the caller); a lone submit is sent from
the caller, a burst goes to the flusher thread, which sends everything queued in one round
trip. Result messages are popped in batches by one reader at a time: a thread waiting in
``result()`` while nobody else reads (no thread hand-off on the latency path), else the
results thread, which also renews this client's liveness key each second and reaps dead
workers (so work held by a dead worker is requeued even when no other worker is alive to
notice). Task processes on this machine send small results to the executor's inbox directly
(``miniray.values.inbox``); the reader's wait ends for either.
"""

from __future__ import annotations

import atexit
import collections
import functools
import itertools
import logging
import os
import threading
import time
import uuid
import weakref
from concurrent.futures import Executor as _BaseExecutor
from concurrent.futures import Future

from . import cache as _cache
from . import comma as _comma
from . import feeding as _feeding
from . import progressbar as _progressbar
from . import keep as _kept
from . import observe
from miniray.broker import Broker, _redact, connect, job_ttl
from miniray.cluster import local as _embedded
from miniray.config import settings
from miniray.values.inbox import Inbox
from miniray.errors import (
    ConfigurationError,
    JobAbandonedError,
    JobCancelledError,
    MinirayError,
    RemoteTraceback,
    ServerError,
    ServerLostError,
    WorkerLostError,
)
from miniray.keys import Keys
from .futures import _WAITING, MinirayFuture, _item_futures
from .limits import Limits, as_limits
from .outcomes import MISSING, cancel_future as _cancel, cancel_ref as _cancel_ref
from .outcomes import failures as _failures, force_cancel as _force_cancel, place as _place
from .outcomes import stop_chunks as _stop_chunks
from miniray.resp import Connection, NoScriptError, RedisError
from miniray.values import bigvalues
from miniray.values import payloads
from miniray.protocol import (Assembler, LostChunk, decode_batches, decode_message, encode_chunk,
                       item_times)
from .rerun import Kept
from miniray.serialization import dumps, dumps_call, dumps_function
from miniray.values.shm import ArgumentsHere, Segments

__all__ = ["Executor", "MinirayFuture"]

_log = logging.getLogger("miniray.executor")

OK = 0

_live_executors: "weakref.WeakSet[Executor]" = weakref.WeakSet()


_HAND_MAX = 64 * 1024  # bytes: a lone chunk up to this size goes to a waiting slot directly
_NO_WAIT_SECONDS = 5.0  # the most shutdown(wait=False) waits for a server that hangs


_MISSING = MISSING  # a map chunk's item not delivered yet


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
        self.values = [_MISSING] * count if is_map else None
        self.errors: dict = {}
        self.left = count
        self.sent = False
        self.big = False  # stored part by part, waiting for the replies (see _send_big)
        self.kept = None  # the payload, kept until it ends to re-run a failure (miniray.client.rerun)
        self.shm = ()  # its arguments' files in shared memory, freed when it ends (see shm)
        self.bigs = ()  # its big arguments' keys on the server (bigvalues): (key, view, part)


class Executor(_BaseExecutor):
    """Run Python functions on miniray workers, with the ``concurrent.futures`` API.

    >>> import miniray
    >>> with miniray.Executor(job_name="squares") as ex:         # doctest: +SKIP
    ...     print(sum(ex.map(lambda x: x * x, range(10_000), chunksize=100)))

    With no ``redis_url`` and no ``MINIRAY_REDIS_URL`` it starts (or reuses) this process's
    embedded local cluster; ``max_workers`` sizes that cluster when this executor is the one
    that starts it (as with ``ProcessPoolExecutor``; an already running cluster is reused).
    ``initializer(*initargs)`` runs once in each task process before the first task of this
    job there; if it raises, those tasks fail with ``InitializerError`` (a ``BrokenExecutor``).
    All tasks of one executor form one job: its ``priority`` (higher runs first), ``limits``
    (a ``Limits``, or a dict of its fields; comma's names too) and ``env`` (extra environment
    variables) apply to every task.

    ``keep=True``: the job outlives this process. If it dies, the job runs on for
    ``MINIRAY_KEEP_GRACE_SECONDS`` and its results are stored on the cluster for
    ``miniray.attach(job_id)``; ``seal()`` says that no more work comes, so the cluster can
    end the job itself (see ``miniray.client.keep``).
    """

    def __init__(self, redis_url: str | None = None, job_name: str | None = None,
                 priority: int = 1, limits: Limits | dict | None = None, env: dict | None = None,
                 max_workers: int | None = None, initializer=None, initargs: tuple = (),
                 keep: bool = False, **unknown):
        if unknown:  # comma's config=, codedir=, force_local=...: say what to do instead
            _comma.refuse_executor_args(unknown)
        self._settings = s = settings()
        if max_workers is not None and (isinstance(max_workers, bool)
                                        or not isinstance(max_workers, int) or max_workers <= 0):
            raise ValueError("max_workers must be greater than 0")
        limits = as_limits(limits)  # a Limits, None, or a dict (comma's names too)
        if isinstance(priority, bool) or not isinstance(priority, int) or abs(priority) > 10**6:
            raise ConfigurationError(
                f"priority must be a whole number between -1000000 and 1000000, not {priority!r}")
        if env is not None and not all(isinstance(k, str) and isinstance(v, str)
                                       for k, v in env.items()):
            raise ConfigurationError("env must map str to str, e.g. env={'OMP_NUM_THREADS': '1'}")
        url = redis_url or s.redis_url
        self._local = None
        if url is None:
            self._local = _embedded.get_local_cluster(max_workers)
            url = self._local.url
        self.redis_url = url
        self.limits, self.priority, self.env = limits, priority, dict(env or {})
        self.client_id = uuid.uuid4().hex[:12]
        self._jobs_made = 0  # a job given up during a long pause is followed by a new one
        self.job_id = f"{self.client_id}.0"
        self.job_name = job_name or self.job_id
        self._r = connect(url)
        # submissions do not wait for their replies (a round trip off the latency path);
        # the results thread reads them each second and breaks the executor on an error
        self._submit_errors: list = []
        self._r.on_deferred_error = self._submit_errors.append
        self._rr = connect(url)  # results: BLMPOP by whichever thread reads (see _read_once)
        # results from task processes on this machine come straight here (miniray.values.inbox)
        # a kept job's results go through the server (the inbox dies with this process)
        self._keep = max(1, round(s.keep_grace_seconds)) if keep else None
        self._sealed = False
        self._inbox = Inbox.open() if s.direct_results and not keep else None
        # large values to and from task processes on this machine: shared memory (miniray.values.shm);
        # arguments only while the server and every worker are on this machine (no worker
        # elsewhere could read them), or where the user says so (MINIRAY_SHM=2)
        self._shm = Segments.open(s.shm_min_bytes) if s.shm and not keep else None
        self._shm_args = None if self._shm is None else ArgumentsHere(
            s.shm == 2, self._local is not None or url.startswith("unix:"),
            lambda: [w.get("shm") for w in self.workers()])
        self._direct_last: dict = {}  # (worker, pid) -> its last chunk finished that way
        self._read_lock = threading.Lock()
        self._read_cond = threading.Condition(self._read_lock)
        self._reader: int | None = None  # the thread that reads results now
        self._undelivered: list = []  # result messages popped and not delivered yet
        self._undelivered_direct: list = []  # the same from the inbox (delivered first)
        self._parts = Assembler()  # a big result message's parts popped so far
        self._demand = False  # futures wait for the results thread to deliver (MinirayFuture)
        self._closed = False
        self._ru = None  # the results thread's, for upkeep (see _results_loop)
        self._heard = time.time()  # when the server last heard from us (see _upkeep)
        self._events_seen = "0-0"  # the job's "started" events read so far (see _mark_running)
        self._broker = Broker(self._r, s.namespace)
        self.keys = self._broker.keys
        self._lock = threading.Lock()
        self._wakeup = threading.Condition(self._lock)
        self._outbox: list[_Ref] = []
        self._flushing = False  # one sender at a time: the flusher thread or an inline submit
        self._last_submit = 0.0
        self._refs: dict[int, _Ref] = {}
        self._big_args = bigvalues.ArgumentKeys()  # big arguments on the server, by chunk
        self._next_task = 0  # task ids: submit order, and a map item's position
        # this job's items that ended done and failed (the rest of its items, once all have
        # ended, were cancelled): the client settles every item, so its tally is the one
        # written to the job's counters when it ends (see _final_counts)
        self._tally = [0, 0]
        self._n_items = 0  # this job's items submitted
        self._chunk_ids = itertools.count()
        self._functions: collections.OrderedDict = collections.OrderedDict()  # id -> (fn, sha)
        self._fn_upload: dict[str, bytes] = {}  # pickled functions not yet in Redis
        self._fn_fresh: dict[str, float] = {}  # sha -> when its TTL was last renewed
        self._shutdown = False
        self._broken: BaseException | None = None
        # cancel() or `miniray cancel`: the job stays "cancelled", and the next submission
        # starts a new job
        self._job_cancelled = False
        self._feeds: "weakref.WeakSet" = weakref.WeakSet()  # map_futures' feeders (feeding)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._init_sha = (self._function(functools.partial(initializer, *initargs))
                          if initializer is not None else None)
        self._create_job()
        self._flusher = threading.Thread(target=self._flush_loop, daemon=True,
                                         name=f"miniray-flush-{self.client_id}")
        self._results = threading.Thread(target=self._results_loop, daemon=True,
                                         name=f"miniray-results-{self.client_id}")
        self._flusher.start()
        self._results.start()
        _live_executors.add(self)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "open"
        return (f"<miniray.Executor job={self.job_name!r} priority={self.priority} "
                f"{state} pending={len(self._refs)} server={_redact(self.redis_url)}>")

    # -- job ---------------------------------------------------------------------------------
    def _create_job(self, pipe=None) -> None:
        """Create ``self.job_id`` on the server (in ``pipe`` when given, else at once)."""
        lim = self.limits
        spec = {"timeout": lim.timeout_seconds, "memory_bytes": lim.memory_bytes,
                "cpus": lim.cpus, "gpus": lim.gpus, "gpu_mem": lim.gpu_memory_mb,
                "keep_children": lim.keep_children,
                "triton": lim.triton, "env": self.env, "init": self._init_sha}
        if self._inbox is not None:
            spec["inbox"] = self._inbox.address
        if self._shm is not None:
            spec["shm"], spec["shm_min"] = self._shm.address, self._shm.min_bytes
        if self._keep is None:  # big result buffers beside their message (miniray.values.bigvalues)
            spec["big"] = 1
        own = pipe is None
        if own:
            pipe = self._r.pipeline()
        grace = self._settings.client_grace_seconds
        pipe.command("SET", self.keys.client(self.client_id), os.getpid(), "EX",
                     max(1, round(grace)))
        self._broker.create_job(pipe, self.job_id, self.client_id, self.job_name,
                                self.priority, spec, lim.requirement_fields(), time.time(),
                                grace, keep=self._keep)
        if own:
            pipe.execute()

    # -- submission --------------------------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs) -> MinirayFuture:
        """Schedule ``fn(*args, **kwargs)``; returns a Future for its result."""
        self._check_open()
        sha = self._function(fn)
        frames = dumps_call(args, kwargs)
        task = self._take_task_ids(1)
        future = MinirayFuture(self, task)
        self._enqueue(sha, task, 1, frames, future, is_map=False)
        return future

    def map(self, fn, *iterables, timeout: float | None = None, chunksize: int = 1,
            buffersize: int | None = None, cache: bool = False, progress=False):
        """Like ``Executor.map``: ordered, lazy results; ``chunksize`` items travel together.

        ``buffersize`` (as in Python 3.14): the input is read lazily, at most that many
        chunks (of ``chunksize`` items) submitted and not yet yielded; each chunk yielded
        lets the next one be read and submitted. An endless generator then runs in flat
        memory on the client and the server. None: the whole input is read and submitted at
        once. Closing the iterator (or Ctrl-C) cancels what was submitted and not yielded.
        The iterator (``feeding.MapResults``) runs through each chunk at C speed when taken
        whole (``list``, ``for``).

        ``cache=True``: an item whose result the cluster's item cache has for this function
        and this argument is not run again (see ``miniray.cache``; only for functions without
        side effects, randomness or a dependence on time or changing files; it reads the
        whole input at once, ``buffersize`` or not).

        ``progress=True`` (or a label: ``progress="resize"``): a tqdm bar on stderr moves as
        items end, and the failed items are summed up at the end (see ``miniray.progress``)."""
        _check_chunksize(chunksize)
        _feeding.check_buffersize(buffersize)
        self._check_open()
        if progress:
            return _progressbar.bar_map(self, fn, iterables, progress, timeout, chunksize,
                                        buffersize, cache)
        return self._map(fn, iterables, timeout, chunksize, buffersize, cache)

    def _map(self, fn, iterables, timeout, chunksize, buffersize, cache, on_chunk=None):
        """``map``'s work; ``on_chunk(future, n)`` is told of each chunk of ``n`` items."""
        if cache:
            return _cache.map(self, fn, iterables, timeout, chunksize)
        deadline = None if timeout is None else time.monotonic() + timeout
        sha = self._function(fn)
        submit = functools.partial(self._map_chunk, sha, on_chunk)
        if buffersize is not None:
            return _feeding.lazy_map(self, submit, iterables, chunksize, buffersize, deadline)
        futures = collections.deque(submit(kind, batch)
                                    for kind, batch in _feeding.batches(iterables, chunksize))
        return _feeding.ordered_results(futures, deadline)

    def _map_chunk(self, sha: str, on_chunk, kind: str, batch: list) -> "MinirayFuture":
        frames = dumps((kind, batch), what="arguments")
        start = self._take_task_ids(len(batch))
        future = MinirayFuture(self, start)
        if on_chunk is not None:
            on_chunk(future, len(batch))
        self._enqueue(sha, start, len(batch), frames, future, is_map=True)
        return future

    def map_futures(self, fn, *iterables, chunksize: int = 1, buffersize: int | None = None,
                    cache: bool = False):
        """Submit ``fn(*args)`` for every item of ``iterables`` (several: zipped, as ``map``);
        return one future per item, in order.

        Unlike ``map`` nothing stops at the first error: each item's exception stays in its
        own future, so a caller can gather every outcome (the notebook face does). Items
        travel ``chunksize`` at a time; cancelling the job (``cancel()``) cancels the futures
        of unfinished items. A future's ``task_id`` is its item's position in this executor.

        Without ``buffersize`` the whole input is submitted now and a list is returned. With
        ``buffersize=N`` a feeder thread reads the input lazily and a ``FutureStream`` (an
        iterator of the futures, in order, with ``close()``) is returned: at most ``N``
        chunks are unfinished on the cluster, and at most ``N`` chunks' futures wait to be
        taken from the iterator; ``shutdown``, ``cancel()`` and ``close()`` stop the
        feeding at once (see ``miniray.client.feeding``).

        ``cache=True``: an item whose result is in the cluster's item cache is not run; its
        future is done at once, with ``cached`` True (see ``miniray.cache``; it reads the
        whole input at once and returns a list, ``buffersize`` or not).

        >>> futures = ex.map_futures(square, range(100), chunksize=10)   # doctest: +SKIP
        >>> for f in ex.map_futures(square, endless(), buffersize=8):    # doctest: +SKIP
        ...     print(f.result())
        """
        _check_chunksize(chunksize)
        _feeding.check_buffersize(buffersize)
        if not iterables:
            raise TypeError("map_futures() needs at least one iterable, e.g. "
                            "map_futures(fn, items)")
        self._check_open()
        if cache:
            return _cache.map_futures(self, fn, iterables, chunksize)
        sha = self._function(fn)
        submit = functools.partial(self._futures_chunk, sha)
        if buffersize is not None:
            return _feeding.FutureStream(self, submit, iterables, chunksize, buffersize)
        out: list = []
        for kind, batch in _feeding.batches(iterables, chunksize):
            out += submit(kind, batch)[1]
        return out

    def fmap(self, fn, *iterables, chunksize: int = 1, buffersize: int = _comma.FMAP_BUFFERSIZE):
        """comma's ``fmap``: one future per item, in order, submitted lazily from a feeder
        thread, at most ``buffersize`` chunks unfinished at a time: ``map_futures(...,
        buffersize=buffersize)`` (a ``FutureStream``; see there)."""
        return self.map_futures(fn, *iterables, chunksize=chunksize, buffersize=buffersize)

    def _futures_chunk(self, sha: str, kind: str, batch: list) -> tuple:
        """One ``map_futures`` chunk: its future, and its items' futures."""
        # "t": its items' timings travel back (a plain map's chunks skip that cost)
        frames = dumps((kind + "t", batch), what="arguments")
        start = self._take_task_ids(len(batch))
        chunk = MinirayFuture(self, start)
        mine = _item_futures(self.job_id, start, len(batch))
        chunk._items = mine  # (they run when the chunk does: see _mark_running)
        # what add_done_callback does, without its lock and its _want per chunk: the chunk
        # is new and unsent (nobody else can settle it), and _enqueue asks for deliveries
        chunk._wanted = True
        chunk._done_callbacks.append(_split_own)
        self._enqueue(sha, start, len(batch), frames, chunk, is_map=True)
        return chunk, mine

    def _stop_feeding(self, why: str) -> None:
        """Feeder threads of ``map_futures(..., buffersize=...)`` read no more input."""
        for feed in list(self._feeds):
            feed.stop(why)

    def _take_task_ids(self, n: int) -> int:
        with self._lock:
            first = self._next_task
            self._next_task += n
            return first

    def _check_open(self) -> None:
        if self._broken is not None:
            raise ServerLostError(f"this executor is broken: {self._broken}")
        if self._shutdown:
            raise RuntimeError("cannot schedule new futures after shutdown")
        if self._sealed:
            raise RuntimeError(f"job {self.job_id} was sealed (seal()): it takes no more work; "
                               "start a new Executor")
        if self._job_cancelled:
            self._renew_job()

    def seal(self, timeout: float = 60.0) -> None:
        """No more work for this (kept) job: once everything submitted has been sent, the
        cluster records how many items it has, and ends the job (``done``) when they all have,
        whether this process still lives or not. Later submissions raise."""
        if self._keep is None:
            raise RuntimeError("seal() is for kept executors (Executor(keep=True))")
        deadline = time.monotonic() + timeout
        with self._lock:
            self._sealed = True
            while (self._outbox or self._flushing) and self._broken is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"seal(): the submissions of job {self.job_id} were "
                                       f"not all sent in {timeout:.0f} s; is the server slow?")
                self._wakeup.wait(min(left, 0.1))
            job, total = self.job_id, self._n_items
        if self._broken is None and not self._job_cancelled:
            self._broker.seal(job, total, self._settings.event_stream_maxlen)

    def _renew_job(self) -> None:
        """After a cancel, new work goes to a new job (a cancelled job takes no more tasks);
        until then ``progress()`` keeps showing the cancelled one."""
        with self._lock:
            if not self._job_cancelled:
                return
            deadline = time.monotonic() + 5.0  # (a send to the old job lands first; a
            while self._flushing and time.monotonic() < deadline:  # hung one is not waited)
                self._wakeup.wait(0.1)
            self._job_cancelled = False
            self._tally, self._n_items = [0, 0], 0
            self._jobs_made += 1
            self.job_id = f"{self.client_id}.{self._jobs_made}"
            self._events_seen = "0-0"
        self._create_job()

    def _interrupt_map(self, pending: list) -> None:
        """Ctrl-C while a ``map`` is read: its tasks stop (queued ones are withdrawn, running
        ones get SIGINT, then are killed) and its futures end cancelled; the executor stays
        usable. When nothing else of this executor is pending the whole job is cancelled (a
        new job takes later work); else only the map's chunks are stopped (see
        ``outcomes.stop_chunks``) and the other futures go on."""
        mine = {id(f) for f in pending}
        with self._lock:
            others = any(id(r.future) not in mine for r in self._refs.values())
        if others:
            _stop_chunks(self, pending)
        else:
            self.cancel()

    def _function(self, fn, fresh: bool = False) -> str:
        """The function's content hash; it is pickled once per executor (LRU of 128), or
        again with ``fresh`` (a cached map: what travels must be what its key says).

        The cache holds functions weakly where it can: an executor must not keep a bound
        method's object (or a closure's cells) alive after its tasks are done.
        """
        with self._lock:
            entry = self._functions.get(id(fn))
            if not fresh and entry is not None and _deref(entry[0]) is fn:
                self._functions.move_to_end(id(fn))
                return entry[1]
        sha, data = dumps_function(fn)
        try:
            held = weakref.ref(fn)
        except TypeError:  # builtins and a few others: they live forever anyway
            held = fn
        with self._lock:
            self._functions[id(fn)] = (held, sha)
            while len(self._functions) > 128:
                self._functions.popitem(last=False)
            if sha not in self._fn_fresh:
                self._fn_upload[sha] = data
        return sha

    def _enqueue(self, sha, start, count, frames, future, is_map) -> None:
        mine, placed = frames, ()
        if self._shm_args is not None and len(frames) > 1 and self._shm_args():
            frames, placed = self._shm.place(frames)
        size = len(frames[0]) if len(frames) == 1 else sum(map(len, frames))
        part = payloads.SMALL_PART
        bigs = ()
        if size >= payloads.BIG:  # (asks the server: only big payloads pay for it)
            payloads.check_room(self._r, size, "arguments")
            part = payloads.big_part_size(self._r)
            if len(frames) > 1 and not placed and self._keep is None:  # big buffers
                # beside the chunk (bigvalues; a kept job's outlive this client: inline)
                frames, bigs = bigvalues.mark(frames, part, self.keys, self.job_id)
        frames = encode_chunk(sha, start, count, frames, part)
        ref = _Ref(next(self._chunk_ids), start, count, future, is_map, frames, sha)
        ref.big = size >= payloads.BIG
        ref.shm, ref.bigs = placed, bigs
        if placed or bigs:  # (a re-run here must not need the files: freed when the chunk ends)
            size = sum(map(len, mine))
        if size <= self._settings.rerun_keep_bytes and (
                not is_map or getattr(future, "_items", None) is not None):  # (not map's)
            # (a reference: no copy, no cost)
            ref.kept = encode_chunk(sha, start, count, mine, part) if placed or bigs else frames
        future._ref = ref
        now = time.monotonic()
        with self._lock:
            if self._shutdown:  # (a map racing a shutdown stops here: what it queued
                # before runs, or is cancelled by cancel_futures, like every other task)
                raise RuntimeError("cannot schedule new futures after shutdown")
            self._refs[ref.chunk] = ref
            self._n_items += count
            wanted = future._wanted  # a callback was added before it was sent (map_futures)
            # A lone submit is sent from here (no thread hand-off on the latency path); a
            # burst queues for the flusher thread, which sends it in a few pipelines.
            inline = not self._outbox and not self._flushing and now - self._last_submit > 2e-4
            self._last_submit = now
            if inline:
                self._flushing = True
            else:
                self._outbox.append(ref)
                self._wakeup.notify()
        if wanted and not self._demand:  # (unlocked: with a ref pending, demand stays set)
            self._want_delivery()
        if inline:
            self._send_safely([ref])

    def _send_safely(self, batch: list) -> bool:
        try:
            for i in range(0, len(batch), 4096):
                self._send(batch[i : i + 4096])
            return True
        except RedisError as e:
            self._break(ServerLostError(
                f"lost the server at {_redact(self.redis_url)} while submitting: {e}"))
            return False
        except BaseException:  # Ctrl-C in an inline send (the caller's own thread)
            self._forget_unsent(batch)
            raise
        finally:
            with self._lock:
                self._flushing = False
                if self._outbox or self._shutdown:  # else the flusher has nothing to do:
                    self._wakeup.notify_all()  # waking it would only take the GIL from us

    def _forget_unsent(self, batch: list) -> None:
        """A send cut short by Ctrl-C: only a caller's inline send (submit, map) is, and its
        futures never reach it (the KeyboardInterrupt does). What of it reached the server
        is unknown (the connection was closed: see resp), so they are cancelled here and
        nothing, shutdown included, waits for them; a chunk that did arrive runs and its
        result is ignored. No round trip: the user may press Ctrl-C because the server
        hangs, and the interrupt must come back at once."""
        with self._lock:
            for ref in batch:
                self._refs.pop(ref.chunk, None)
        for ref in batch:
            _cancel(ref.future)

    def _flush_loop(self) -> None:
        while True:
            with self._lock:
                while (not self._outbox or self._flushing) and not self._shutdown:
                    self._wakeup.wait()
                while self._flushing:  # shutting down: let an inline send finish first
                    self._wakeup.wait()
                if not self._outbox:
                    return  # shut down and nothing left to send
                batch, self._outbox = self._outbox, []
                self._flushing = True
            sent = self._send_safely(batch)
            # (not held while this thread waits: its refs hold their futures, and so the
            # results, which the user may have dropped long since)
            batch = None
            if not sent:
                return

    def _send(self, batch: list) -> None:
        s, k, job = self._settings, self.keys, self.job_id
        pipe = self._r.pipeline()
        now = time.monotonic()
        with self._lock:
            upload, self._fn_upload = self._fn_upload, {}
        for sha, data in upload.items():
            pipe.command("SET", k.fn(sha), data, "EX", s.function_ttl_seconds)
            self._fn_fresh[sha] = now
        for sha in {ref.sha for ref in batch}:  # renew what is in use, at most hourly
            if now - self._fn_fresh.get(sha, now) > 3600:
                pipe.command("EXPIRE", k.fn(sha), s.function_ttl_seconds)
                self._fn_fresh[sha] = now
        live = [ref for ref in batch if not ref.future.cancelled()]
        big = [ref for ref in live if ref.big]
        if big:
            live = [ref for ref in live if not ref.big]
        if len(live) == 1 and len(live[0].frames) == 1 and len(live[0].frames[0]) <= _HAND_MAX:
            # a lone small chunk (a submit): one script stores it and hands it straight to
            # the slot that went idle last, if one waits (no claim to look for it)
            ref = live[0]
            self._broker.publish_one(pipe, job, self.priority, ref.entry, ref.frames[0],
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
            self._broker.publish(pipe, job, self.priority, len(entries), n_items,
                                 s.event_stream_maxlen)
        if self._keep is not None:  # where each chunk's items go, for attachers
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
        s, k, job = self._settings, self.keys, self.job_id
        size = sum(map(len, ref.frames)) + sum(view.nbytes for _, view, _ in ref.bigs)
        names = [Keys.payload_field(ref.chunk, i) for i in range(len(ref.frames))]
        refused = None
        if ref.bigs:  # its big buffers first, each beside the chunk (miniray.values.bigvalues)
            refused = self._big_args.store(self._r, ref.chunk, ref.bigs,
                                           job_ttl(s.client_grace_seconds))
        if refused is None:
            pipe = self._r.pipeline()
            for name, frame in zip(names, ref.frames):
                pipe.command("HSET", k.tasks(job), name, frame)
            replies = pipe.execute(raise_on_error=False)
            refused = next((r for r in replies if isinstance(r, RedisError)), None)
        ref.frames = None
        if refused is None:
            pipe = self._r.pipeline()
            if self._keep is not None:
                _kept.index(pipe, k, job, [ref])
            pipe.command("RPUSH", k.queue(job), ref.entry)
            self._broker.publish(pipe, job, self.priority, 1, ref.count, s.event_stream_maxlen)
            replies = pipe.execute(raise_on_error=False)
            refused = next((r for r in replies[:len(replies) - 1]
                            if isinstance(r, RedisError)), None)
        if refused is not None:
            try:
                self._r.execute("HDEL", k.tasks(job), *names)
            except RedisError:
                pass  # (they go with the job)
            with self._lock:
                self._refs.pop(ref.chunk, None)
                self._tally[1] += ref.count
            self._free_shm(ref)
            try:
                ref.future.set_exception(payloads.refused(size, "task's arguments", refused))
            except Exception:  # cancelled meanwhile
                pass
            return
        ref.sent = True
        if isinstance(replies[-1], NoScriptError):  # stored and queued; its wake-up is owed
            self._broker.load_scripts()
            self._broker.publish(None, job, self.priority, 1, ref.count,
                                 s.event_stream_maxlen)

    def _withdraw(self, ref: _Ref) -> bool:
        """Take a chunk back before any worker claims it; False if one already has."""
        with self._lock:
            if not ref.sent:
                if ref in self._outbox:
                    self._outbox.remove(ref)
                self._refs.pop(ref.chunk, None)
                self._free_shm(ref)
                return True
        try:
            removed = self._broker.cancel_chunk(self.job_id, ref.entry)
        except RedisError:
            return False
        if removed:
            with self._lock:
                self._refs.pop(ref.chunk, None)
            self._free_shm(ref)
        return removed

    def _free_shm(self, ref: _Ref, reuse: bool = False) -> None:
        """Unlink a chunk's arguments in shared memory, and its big ones on the server (see
        bigvalues): it has ended, or never will run (a task process that mapped them keeps
        its mapping); ``reuse``: it ended with all its results, its shared-memory files may
        be written again (``Segments.free``)."""
        if ref.shm:
            paths, ref.shm = ref.shm, ()
            self._shm.free(paths, reuse)
        if ref.bigs:  # on the server: deleted by the next upkeep (no round trip here)
            ref.bigs = ()
            self._big_args.end(ref.chunk)

    # -- results -----------------------------------------------------------------------------
    # Results are read by one thread at a time (the "reader"): a caller waiting in
    # MinirayFuture.result() while nobody else reads, or the results thread. The results
    # thread reads when futures are wanted without anyone reading (callbacks, wait(),
    # as_completed(), done(), shutdown), and once a second for results nobody has asked for
    # yet; every second it also renews this client's keys and reaps dead workers.

    def _want_delivery(self) -> None:
        with self._read_lock:
            if not self._demand:
                self._demand = True
                self._read_cond.notify()

    def _wake_reader(self) -> None:
        """End the wait of the thread reading results now, if one is (a future it may be
        waiting for was cancelled): a wake-up message it skips."""
        if self._reader is not None and self._broken is None:
            try:
                self._r.send_deferred([("RPUSH", self.keys.results(self.client_id), b"S")])
            except RedisError:
                pass

    def _poke_results_thread(self) -> None:
        """Have the results thread look again (shutdown, or futures settled without it)."""
        with self._read_lock:
            self._read_cond.notify()

    def _read_until(self, fut: MinirayFuture, timeout: float | None) -> float | None:
        """Read results in this thread until ``fut`` is done, while no other thread reads;
        return what is left of ``timeout`` for the wait that follows."""
        deadline = None if timeout is None else time.monotonic() + timeout
        me = threading.get_ident()
        while fut._state in _WAITING:
            with self._read_lock:
                if self._reader is not None or self._closed or self._broken is not None:
                    fut._wanted = True  # whoever reads delivers; the thread takes over
                    if not self._demand:
                        self._demand = True
                        self._read_cond.notify()
                    break
                self._reader = me
            try:
                wait, left = self._settings.heartbeat_seconds, None
                if deadline is not None:
                    left = deadline - time.monotonic()
                    wait = min(wait, left)
                    if wait <= 0:
                        break
                # the server answers a BLMPOP within ``wait``; a hung one must not keep a
                # caller with a timeout past its deadline (the reply stays owed, not lost)
                self._read_once(wait, left)
            except RedisError:  # the results thread decides whether the server is gone
                fut._want()
                break
            finally:
                with self._read_lock:
                    self._reader = None
                    if self._demand or self._shutdown or self._broken is not None:
                        self._read_cond.notify()
        return None if deadline is None else max(0.0, deadline - time.monotonic())

    @property
    def _read_owed(self) -> bool:
        """A BLMPOP was sent whose reply nobody has read yet (the results connection sends
        nothing else)."""
        return self._rr.owed > 0

    def _read_once(self, timeout: float, give_up: float | None = None) -> None:
        """One BLMPOP of result messages (waiting up to ``timeout`` s) and their delivery;
        ``give_up``: seconds after which to stop waiting for the reply (ReplyTimeout).
        Only the reader calls it; a reply left owed by an earlier reader is read first.

        Messages in the inbox end the wait early (the BLMPOP stays owed, for the next
        read), and go first: a crash report that came through Redis names the items still
        missing after the outcomes their process had sent directly."""
        if not self._undelivered and not self._undelivered_direct:
            if not self._read_owed:  # (the connection counts what it owes: a Ctrl-C
                # between the send and any flag of ours cannot put the two out of step)
                self._rr.send_command("BLMPOP", round(max(timeout, 0.001), 3), 1,
                                      self.keys.results(self.client_id), "LEFT", "COUNT", 1024)
            if self._inbox is not None and not self._rr.wait_reply_or(
                    self._inbox.fileno(), give_up):
                got = False  # (the BLMPOP's reply stays owed)
            else:
                got = self._rr.read_reply(give_up)
            if got is not False:
                if isinstance(got, Exception):
                    raise got
                self._undelivered = list(got[1]) if got else []
                if self._keep is not None and self._undelivered:  # stored results: read
                    self._undelivered = _kept.resolve(self._rr, self.keys, self._undelivered)
            if self._inbox is not None:
                self._undelivered_direct = self._inbox.drain()
        # taken from the server or the inbox: each is delivered before the next reader reads
        # (a caller interrupted here, by Ctrl-C, leaves the rest to the next one)
        msgs = self._undelivered_direct
        while msgs:
            self._deliver(msgs[0], direct=True)
            del msgs[0]
        msgs = self._undelivered
        while msgs:
            self._deliver(msgs[0])
            del msgs[0]

    def _upkeep(self, broker: Broker) -> bool:
        """Renew this client's liveness key and its job's TTLs, reap dead workers, check the
        job. False when the executor is broken."""
        s, k, job = self._settings, self.keys, self.job_id
        # the submissions' replies that came: an error among them breaks the executor (not
        # waiting for the rest, nor holding the submit connection: the server may hang)
        self._r.read_available()
        grace = max(1, round(s.client_grace_seconds))
        pipe = broker.r.pipeline()
        # our liveness key, read before it is renewed: gone means that the cluster may have
        # given our job up (we were silent for the grace: paused, or the server was)
        pipe.command("EXISTS", k.client(self.client_id))
        pipe.command("SET", k.client(self.client_id), os.getpid(), "EX", grace)
        # while this executor lives its job's keys do; if it dies they expire
        ttl = job_ttl(grace if self._keep is None else self._keep)
        for live in (k.job(job), k.logs(job), k.events(job), k.attempts(job), k.stop(job)):
            pipe.command("EXPIRE", live, ttl)
        self._big_args.upkeep(pipe, ttl, self._refs)
        if self._keep is not None:
            _kept.renew(pipe, k, job, ttl)
        broker.reap(s.worker_dead_seconds, s.max_retries, s.event_stream_maxlen,
                    s.result_ttl_seconds, pipe=pipe)
        pipe.command("HGET", k.job(job), "state")
        started = bool(self._refs)
        if started:  # which chunks workers took: their futures are running
            pipe.command("XRANGE", k.events(job), "(" + self._events_seen, "+", "COUNT", 10000)
        replies = pipe.execute()
        now = time.time()  # (wall clock: a machine's sleep counts)
        silent, self._heard = now - self._heard, now
        state = replies[-2] if started else replies[-1]
        if started:
            self._mark_running(replies[-1])
        # (a kept job is not given up while we are silent: it runs on, see miniray.client.keep)
        if not replies[0] and self._keep is None and (state is not None
                                                      or silent >= grace / 2):
            self._abandoned(broker, job, silent)
            return True
        if self._submit_errors:
            self._break(ServerError(
                f"the server at {_redact(self.redis_url)} refused a submission: "
                f"{self._submit_errors[0]}; pending futures fail. Check the server (memory, "
                "version) and start a new Executor."))
            return False
        if state == b"cancelled" and self._refs:
            self._cancelled_elsewhere()  # `miniray cancel`: no result will come
        elif state is None:
            self._break(ServerLostError(
                f"the server at {_redact(self.redis_url)} no longer knows job {self.job_id} (it "
                "restarted and lost its data, or someone deleted its keys); pending futures "
                "fail. Start a new Executor."))
            return False
        return True

    def _mark_running(self, events: list) -> None:
        """Futures of chunks a worker took are running (``Future.running()``, and ``cancel()``
        returns False), as with ProcessPoolExecutor once a task is handed to a worker."""
        for entry_id, fields in events:
            self._events_seen = entry_id.decode()
            if fields[1] != b"started":
                continue
            chunks = dict(zip(fields[::2], fields[1::2])).get(b"chunks")
            for chunk in chunks.split(b",") if chunks else ():
                ref = self._refs.get(int(chunk))
                if ref is not None:
                    ref.future.set_running_or_notify_cancel_safe()
                    for item in getattr(ref.future, "_items", ()):  # (map_futures)
                        item.set_running_or_notify_cancel_safe()

    def _abandoned(self, broker: Broker, job: str, silent: float) -> None:
        """The cluster gave our job up (or is about to: our liveness key expired) while it
        heard nothing from us. What was pending fails with a clear error; the executor goes
        on with a new job."""
        grace = self._settings.client_grace_seconds
        with self._lock:
            while self._flushing:  # (a send to the old job must land before it is closed)
                self._wakeup.wait(0.1)
            refs = list(self._refs.values())
            self._refs.clear()
            self._outbox.clear()
            self._jobs_made += 1
            self.job_id = f"{self.client_id}.{self._jobs_made}"
            self._events_seen = "0-0"
            self._tally, self._n_items = [0, 0], 0
        pipe = broker.r.pipeline()
        broker.cancel_job(job, "orphaned", self._settings.event_stream_maxlen, pipe=pipe)
        pipe.command("DEL", self.keys.results(self.client_id))
        self._create_job(pipe)
        pipe.execute()
        self._parts = Assembler()  # (a big message cut short by that DEL is not waited for)
        _log.warning("executor %s: the cluster gave job %s up after %.0f s of silence; %d "
                     "pending task(s) fail", self.job_name, job, silent, len(refs))
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

    def _results_loop(self) -> None:
        s = self._settings
        next_upkeep = 0.0
        lost_since = None
        # upkeep has a connection of its own: neither a reader's BLMPOP nor the submissions
        # wait for it (nor it for them)
        self._ru = Connection(self.redis_url)
        broker = Broker(self._ru, s.namespace, load=False)
        me = threading.get_ident()
        while True:
            with self._read_lock:
                while True:
                    finished = self._shutdown and not self._refs and not self._outbox
                    if (finished or self._broken is not None) and self._reader is None:
                        self._closed = True
                        break
                    now = time.monotonic()
                    upkeep = now >= next_upkeep
                    if not self._refs and not self._outbox:
                        self._demand = False
                    # (a BLMPOP left owed is a reason to read, unless results also come
                    # to the inbox: then it is the usual state after a direct result)
                    if upkeep or (self._reader is None and not finished and (
                            self._demand or (self._read_owed and self._inbox is None))):
                        break
                    self._read_cond.wait(next_upkeep - now)
                if self._closed:
                    break
                read = self._reader is None and (bool(self._refs) or self._read_owed)
                if read:
                    self._reader = me
            try:
                if upkeep:
                    next_upkeep = time.monotonic() + s.heartbeat_seconds
                    if not self._upkeep(broker):
                        continue
                if read:
                    self._read_once(s.heartbeat_seconds)
                lost_since = None
            except NoScriptError:  # the server restarted and lost our scripts
                broker.load_scripts()
            except RedisError as e:
                if self._local is not None and not self._local.server_alive():
                    lost_since = 0.0  # our own server died: no point in waiting
                lost_since = time.monotonic() if lost_since is None else lost_since
                if time.monotonic() - lost_since > 3.0:
                    self._break(ServerLostError(
                        f"lost the server at {_redact(self.redis_url)} with tasks pending: {e}"
                        ". The pending futures fail; start a new Executor once it is back."))
                else:
                    time.sleep(0.2)
                    next_upkeep = 0.0  # try again soon
            except BaseException:  # a done-callback's SystemExit or KeyboardInterrupt (a
                # future lets through what is not an Exception): this thread must go on
                _log.exception("a done-callback of executor %s raised", self.job_name)
            finally:
                if read:
                    with self._read_lock:
                        self._reader = None
        self._close_job()

    def _await_reports(self, timeout: float = 5.0) -> None:
        """Wait until the server has the reports of the outcomes that reached this client
        straight from their task processes (``miniray.values.inbox``), so that ``progress()``,
        ``events()`` and ``logs()`` after a ``result()`` count its task. A process reports
        right after it sends, so this is a wait only when a process was held up in between
        (each one's reports arrive in order: its last chunk finished stands for the rest)."""
        deadline = time.monotonic() + timeout
        while self._direct_last:
            last = list(self._direct_last.items())
            there = self._r.pipeline_raw([("HEXISTS", self.keys.wip(worker),
                                           Keys.wip_field(self.job_id, chunk))
                                          for (worker, _), chunk in last])
            late = time.monotonic() > deadline  # (it died before reporting: the chunk reruns)
            with self._lock:
                for (key, chunk), held in zip(last, there):
                    if (not held or late) and self._direct_last.get(key) == chunk:
                        del self._direct_last[key]
            if late:
                return
            time.sleep(0.002)

    def _deliver(self, msg: bytes, direct: bool = False) -> None:
        """Settle what a result message says (``direct``: it came to the inbox)."""
        if not direct and not self._parts.left and msg[:1] == b"P":  # a kept job's result,
            # stored on the server (a part of a big message may start with any byte)
            msg = _kept.fetch(self._rr, self.keys, msg)
            if msg is None:
                return  # (gone: the job expired; its futures fail with the job)
        elif not direct:  # a big message comes in parts (see protocol.encode_result)
            msg = self._parts.feed(msg)
            if msg is None:
                return
        if msg == b"S":
            return  # shutdown's wake-up call
        decoded = decode_message(msg)
        if isinstance(decoded, LostChunk):
            ref = self._refs.get(decoded.chunk)
            if ref is not None:
                if decoded.reason == "closing":
                    err = WorkerLostError(
                        f"worker {decoded.worker} was lost (or left) while it ran this task, "
                        "after shutdown(cancel_futures=True) had dropped the job's queue, so "
                        "the task could not run again")
                else:
                    err = WorkerLostError(
                        f"worker {decoded.worker} stopped heartbeating while it held this "
                        f"task, and the task was already retried {self._settings.max_retries}"
                        " time(s) (MINIRAY_MAX_RETRIES); the task may crash its worker")
                self._settle(ref, None, [], {-1: (err, "", None)}, True, decoded.worker, "?", 0)
            return
        header, blob = decoded
        bigvalues.reading(self.redis_url)  # (where its big buffers are, if it has any)
        if direct:  # its process's report follows: see _await_reports
            finals = [chunk for chunk, final in header.chunks if final]
            if finals:
                with self._lock:
                    self._direct_last[(header.worker, header.pid)] = finals[-1]
        refs = [self._refs.get(chunk) for chunk, _ in header.chunks]
        if not any(refs):  # duplicates after a retry, or cancelled tasks
            if self._shm is not None and not isinstance(blob, Exception):
                decode_batches(blob, header.host, [None] * len(refs))  # (frees its files)
            return
        if isinstance(blob, Exception):  # another protocol version: fail what it was for
            batches = [(None, [], {-1: (blob, "", header.pid)}, None)] * len(refs)
        else:  # a value that cannot be unpickled here fails only its own item
            batches = decode_batches(blob, header.host,
                                     [None if ref is None else ref.start for ref in refs])
        for ref, (_, final), (indices, values, errors, times) in zip(refs, header.chunks,
                                                                     batches):
            if ref is not None:
                self._settle(ref, indices, values, errors, final, header.worker, header.host,
                             header.pid, times, header.slot)

    def _settle(self, ref: _Ref, indices, values, errors, final, worker, host, pid,
                times=None, slot=None) -> None:
        if -1 in errors:  # one error for every item not delivered yet
            err = errors.pop(-1)
            if ref.is_map:
                indices = [i for i, v in enumerate(ref.values) if v is _MISSING]
            else:
                indices = [0] if ref.left else []
            values = [None] * len(indices)
            errors = {i: err for i in indices}
        for i, (exc, tb, epid) in errors.items():
            errors[i] = _decorate(exc, tb, ref.start + i, self.job_id, worker, host, epid or pid)
        tally = self._tally
        if not ref.is_map:
            if ref.left and (values or errors):
                ref.left = 0
                if not errors:
                    tally[0] += 1
                elif not isinstance(errors[0], JobCancelledError):
                    tally[1] += 1
                fut = ref.future
                fut.slot, fut._times = slot, times
                if errors and ref.kept is not None and not isinstance(errors[0],
                                                                      JobCancelledError):
                    fut._rerun = Kept(self.redis_url, self.keys, ref.sha, ref.kept, fut.job)
                self._complete(ref, (1, errors[0]) if errors else (OK, values[0]), worker, host)
        else:
            vals = ref.values
            if isinstance(indices, range) and ref.left == ref.count and indices.step == 1:
                vals[indices.start:indices.stop] = values  # the common case: one slice
                ref.left -= len(indices)
                ref.errors.update(errors)
                tally[0] += len(indices) - len(errors)
                if errors:
                    tally[1] += _failures(errors.values())
            else:
                for k, i in enumerate(indices):
                    if vals[i] is _MISSING:
                        vals[i] = values[k]
                        ref.left -= 1
                        if i in errors:
                            ref.errors[i] = errors[i]
                            tally[1] += _failures((errors[i],))
                        else:
                            tally[0] += 1
            items = getattr(ref.future, "_items", None)
            if items is not None:  # map_futures: each item's future says where and when
                _place(items, indices, worker, host, slot, item_times(times, len(values)))
            if ref.left <= 0:
                if ref.errors and ref.kept is not None:  # for its failed items (_split_chunk)
                    ref.future._rerun = Kept(self.redis_url, self.keys, ref.sha, ref.kept,
                                             ref.future.job)
                self._complete(ref, (OK, (vals, ref.errors)), worker, host)
        if ref.left <= 0:
            self._free_shm(ref, reuse=True)
            with self._lock:
                self._refs.pop(ref.chunk, None)
            ref.future._ref = None  # nothing may keep a result alive but its future
            ref.values = ref.errors = ref.kept = None

    def _complete(self, ref: _Ref, value, worker, host) -> None:
        fut = ref.future
        fut.worker, fut.host = worker, host
        with fut._condition:
            if fut._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"):
                return
            if fut._state == "PENDING":
                fut._state = "RUNNING"
        if value[0] != OK and isinstance(value[1], JobCancelledError):
            with fut._condition:  # the job was cancelled: the future is cancelled, not failed
                fut._state = "PENDING"
            _cancel(fut)
            return
        try:
            if value[0] == OK:
                fut.set_result(value[1])
            else:
                fut.set_exception(value[1])
        except Exception:  # InvalidStateError from a concurrent cancel: nothing to deliver
            pass

    def _break(self, err: BaseException) -> None:
        with self._lock:
            self._broken = err
            refs, self._refs = list(self._refs.values()), {}
            self._outbox.clear()
            self._wakeup.notify_all()
        self._poke_results_thread()
        for ref in refs:
            self._free_shm(ref)
            fut = ref.future
            with fut._condition:
                if fut._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"):
                    continue
            try:
                fut.set_exception(err)
            except Exception:
                pass

    # -- shutdown ----------------------------------------------------------------------------
    def shutdown(self, wait: bool = True, *, cancel_futures: bool = False) -> None:
        """Stop accepting work; with ``cancel_futures`` drop queued tasks; with ``wait`` wait
        for the rest. Workers of the embedded local cluster stay up for the next executor."""
        with self._lock:
            first = not self._shutdown
            self._shutdown = True
            self._wakeup.notify_all()
        self._stop_feeding("the executor was shut down")
        if wait:
            self._tell_server(first, cancel_futures)
        else:  # a server that hangs (SIGSTOP) must not hold a caller that does not wait, the
            # interpreter's exit among them (atexit): what it has not heard by then, it hears
            # from the threads left behind if it answers again
            t = threading.Thread(target=self._tell_server, args=(first, cancel_futures),
                                 daemon=True, name=f"miniray-shutdown-{self.client_id}")
            t.start()
            t.join(_NO_WAIT_SECONDS)
        self._poke_results_thread()
        if wait:
            self._want_delivery()  # what is still pending must come in without a caller
            self._flusher.join()
            self._results.join()
            _cache.flush_for(self)  # results of a cache=True map are stored (bounded)

    def _tell_server(self, first: bool, cancel_futures: bool) -> None:
        if first and self._broken is None:
            try:  # wake the results thread so it can notice
                self._r.execute("RPUSH", self.keys.results(self.client_id), b"S")
            except RedisError:
                pass
        if cancel_futures:
            self._cancel_queued()

    def _cancel_queued(self) -> None:
        with self._lock:
            local = [r for r in self._outbox]
            self._outbox.clear()
            for r in local:
                self._refs.pop(r.chunk, None)
            # a batch being sent now must land before the job is closed: its entries would
            # be pushed after the cancel, into a queue nobody claims from, and never settle
            # (the send only writes to the socket: short, unless the server hangs; then its
            # chunks are not cancelled, and run once it answers again)
            deadline = time.monotonic() + 5.0
            while self._flushing and self._broken is None and time.monotonic() < deadline:
                self._wakeup.wait(0.1)
        entries = []
        if self._broken is None:
            try:
                entries = set(self._broker.cancel_job(self.job_id, "closing",
                                                      self._settings.event_stream_maxlen))
            except RedisError:
                entries = set()
        with self._lock:
            dropped = [r for r in self._refs.values() if r.entry in entries]
            for r in dropped:
                self._refs.pop(r.chunk, None)
            self._wakeup.notify_all()
        self._poke_results_thread()
        for r in local + dropped:
            _cancel(r.future)

    def cancel(self) -> int:
        """Cancel the whole job now: queued tasks are dropped and running ones interrupted
        (SIGINT, then killed). Their futures are cancelled, running ones included (what a
        ``map_futures`` chunk delivered before stays in its items' futures); the job's
        counters then say what the futures say. Returns how many chunks were pending.
        The executor stays usable: what is submitted next runs as a new job."""
        with self._lock:
            self._job_cancelled = True
            self._outbox.clear()  # nothing more is sent; a batch being sent lands first
            deadline = time.monotonic() + 5.0
            while self._flushing and self._broken is None and time.monotonic() < deadline:
                self._wakeup.wait(0.1)
        try:
            self._broker.cancel_job(self.job_id, "cancelled", self._settings.event_stream_maxlen)
        except RedisError:
            pass
        return self._cancel_pending()

    def _cancelled_elsewhere(self) -> None:
        """The job was cancelled by someone else (``miniray cancel``): cancel its futures."""
        self._cancel_pending()

    def _cancel_pending(self) -> int:
        """Every future not settled yet ends cancelled (after the job was cancelled on the
        server: no outcome is counted there after that); then the job's counters are set to
        this client's tally, which every reader (``progress()``, ``miniray status``) shows."""
        self._stop_feeding(f"job {self.job_id} was cancelled")
        with self._lock:
            self._job_cancelled = True
            refs = list(self._refs.values())
            self._outbox.clear()
            self._refs.clear()
            self._wakeup.notify_all()
        self._poke_results_thread()
        self._wake_reader()
        # a reader delivering a message now finishes it first (it holds refs it looked up)
        deadline = time.monotonic() + 2.0
        while self._reader not in (None, threading.get_ident()) and time.monotonic() < deadline:
            time.sleep(0.005)
        for r in refs:
            self._free_shm(r)
            _cancel_ref(r)
        if self._broken is None:
            try:
                pipe = self._r.pipeline()
                pipe.command("HSET", self.keys.job(self.job_id), *self._final_counts())
                pipe.execute()
            except RedisError:
                pass
        return len(refs)

    def _final_counts(self) -> list:
        """The job's counters as this client's futures say, for HSET: every item submitted
        has ended (done, failed, or else cancelled)."""
        done, failed = self._tally
        total = self._n_items
        return ["done", done, "failed", failed, "cancelled", max(0, total - done - failed),
                "running", 0, "queued", 0]

    def _close_job(self) -> None:
        s, k, job = self._settings, self.keys, self.job_id
        try:
            pipe = self._r.pipeline()
            # a cancelled job stays "cancelled", with the counters cancel() wrote
            if self._broken is None and not self._job_cancelled:
                self._await_reports()  # marked done after its last outcome has landed
                # every item has ended: the counters say what the futures say (see
                # _final_counts)
                pipe.command("HSET", k.job(job), *self._final_counts(), "state", "done",
                             "finished", repr(time.time()))
                if self._keep is not None:  # we collected every result
                    _kept.linger(pipe, k, job)
            for key in (k.job(job), k.logs(job), k.events(job), k.attempts(job), k.stop(job)):
                pipe.command("EXPIRE", key, s.result_ttl_seconds)
            pipe.command("DEL", k.queue(job), k.tasks(job), k.client(self.client_id),
                         k.results(self.client_id))
            pipe.command("ZREM", k.jobs, job)
            self._big_args.upkeep(pipe, 1, ())  # (what is left: arguments of cancelled tasks)
            pipe.execute()
        except RedisError:
            pass
        for c in (self._r, self._rr, self._ru):
            try:
                c.close()
            except Exception:
                pass
        if self._inbox is not None:  # (no reader is left: _closed is set)
            self._inbox.close()
        if self._shm is not None:  # what is left: arguments of cancelled tasks, results unread
            self._shm.close()

    # -- observation (the notebook face uses these) ------------------------------------------
    def progress(self) -> dict:
        """This job's item counters (queued, running, done, failed, cancelled), ``state``,
        ``status`` (in words) and more: see ``miniray.client.observe.job_progress``."""
        self._await_reports()
        return observe.job_progress(self._r, self.keys, self.job_id)

    def logs(self, follow: bool = False, timeout: float | None = None, since: str = "0-0"):
        """Iterate this job's captured log lines (:class:`miniray.client.observe.LogLine`).

        With ``follow`` it waits for new lines until ``timeout`` or until the executor is shut
        down with nothing pending. Each iterator has its own connection, closed at its end.
        """
        return self._stream(observe.iter_logs, follow, timeout, since)

    def events(self, follow: bool = False, timeout: float | None = None, since: str = "0-0"):
        """Iterate this job's task events (queued, started, finished, failed, retried, ...)."""
        return self._stream(observe.iter_events, follow, timeout, since)

    def _stream(self, reader, follow, timeout, since):
        self._await_reports()
        conn = connect(self.redis_url)
        try:
            yield from reader(conn, self.keys, self.job_id, follow=follow, timeout=timeout,
                              since=since, stop=self._finished_event())
        finally:
            conn.close()

    def add_log_callback(self, fn, since: str = "$") -> threading.Thread:
        """Call ``fn(line)`` from a background thread for each new log line of this job."""
        return observe.follow_in_thread(self.logs(follow=True, since=since), fn)

    def workers(self) -> list:
        """The live workers' latest heartbeats (host, slots, CPU, RAM, GPUs)."""
        return observe.list_workers(self._r, self.keys)

    def cache_clear(self) -> int:
        """Empty the cluster's item cache (``cache=True`` maps); returns how many entries it
        had."""
        return _cache.clear(self.redis_url)

    def _finished_event(self):
        def finished():
            if not (self._shutdown and not self._refs):
                return False
            self._await_reports()  # the last lines come before the last reports
            return True
        return finished


def _decorate(exc, tb: str, task: int, job: str, worker: str, host: str, pid) -> BaseException:
    """The task's own exception, with the worker's traceback chained and where it ran."""
    if not isinstance(exc, BaseException):
        exc = MinirayError(f"task {task} failed with a non-exception {exc!r}")
    argument = getattr(tb, "argument", None)  # a TaskTraceback's: see miniray.tracebacks
    where = f"task {task}" + (f" (argument {argument})" if argument is not None else "") + (
        f" of job {job} on {host} (worker {worker}") + (f", pid {pid})" if pid else ")")
    if tb:
        cause = RemoteTraceback(f'\n"""\nTraceback from {where}:\n{tb.rstrip()}\n"""',
                                getattr(tb, "frames", ()), getattr(tb, "chain", ()), argument)
        exc.__cause__ = cause
    if hasattr(exc, "add_note"):
        note = f"[miniray] raised by {where}"
        if note not in (getattr(exc, "__notes__", None) or ()):
            exc.add_note(note)
    return exc


def _check_chunksize(chunksize) -> None:
    if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
        raise ValueError("chunksize must be >= 1.")


def _split_own(chunk: Future) -> None:
    _split_chunk(chunk, chunk._items)


def _split_chunk(chunk: Future, items: list) -> None:
    """Hand a finished map chunk's outcome to its items' futures (``map_futures``)."""
    if chunk.cancelled():
        for f in items:
            _force_cancel(f)  # (running ones too: the job was cancelled)
        return
    exc = chunk.exception()
    values, errors = (None, None) if exc is not None else chunk.result()
    for i, f in enumerate(items):
        if f.worker is None:
            f.worker, f.host = chunk.worker, chunk.host
        try:
            err = exc if exc is not None else errors.get(i) if errors else None
            if isinstance(err, JobCancelledError):  # interrupted by the job's cancel
                _force_cancel(f)
            elif err is not None:
                f._rerun = chunk._rerun  # (its own argument: the item's task_id picks it)
                f.set_exception(err)
            else:
                f.set_result(values[i])
        except Exception:  # the item's future was cancelled meanwhile
            pass


@atexit.register
def _shutdown_all() -> None:
    for ex in list(_live_executors):
        if ex._keep is not None and not ex._shutdown:
            continue  # a kept job outlives its process (a kernel restart): the cluster ends it
        try:
            ex.shutdown(wait=False, cancel_futures=True)
        except Exception:
            pass
        if ex._inbox is not None:
            ex._inbox.remove()  # (its socket stays open for a reader still at work)
        if ex._shm is not None:
            ex._shm.close()


_embedded.before_stop(_shutdown_all)
