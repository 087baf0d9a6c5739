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

The ``Executor`` is a facade over parts with one job each, all sharing its lock, its chunks
in flight (``_refs``) and its job's identity and tally:

- ``outbox.Outbox``: submission (chunks, the flusher thread, sending, withdrawing);
- ``results.Results``: reading results (who reads, the results thread, upkeep);
- ``delivery.Delivery``: what a result message settles in the futures;
- ``lifecycle.JobLifecycle``: creating, renewing, sealing, cancelling and closing the job;
- observation (``progress``, ``logs``, ``events``, ``workers``): ``miniray.client.observe``.
"""

from __future__ import annotations

import atexit
import collections
import functools
import threading
import time
import uuid
import weakref
from concurrent.futures import Executor as _BaseExecutor

from miniray.broker import Broker, _redact, connect
from miniray.cluster import local as _embedded
from miniray.config import settings
from miniray.errors import ConfigurationError, ServerLostError
from miniray.serialization import dumps, dumps_call
from miniray.values.inbox import Inbox
from miniray.values.shm import ArgumentsHere, Segments

from . import cache as _cache
from . import comma as _comma
from . import feeding as _feeding
from . import observe
from . import progressbar as _progressbar
from .delivery import Delivery
from .futures import MinirayFuture, _item_futures
from .lifecycle import JobLifecycle
from .limits import Limits, as_limits
from .outbox import Outbox
from .outcomes import split_own as _split_own
from .outcomes import stop_chunks as _stop_chunks
from .results import Results

__all__ = ["Executor", "MinirayFuture"]

_live_executors: "weakref.WeakSet[Executor]" = weakref.WeakSet()


_NO_WAIT_SECONDS = 5.0  # the most shutdown(wait=False) waits for a server that hangs


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
        self._lifecycle = JobLifecycle(self)  # the job: created, renewed, cancelled, closed
        self.job_id = f"{self.client_id}.0"
        self.job_name = job_name or self.job_id
        self._r = connect(url)
        # submissions do not wait for their replies (a round trip off the latency path);
        # the results thread reads them each second and breaks the executor on an error
        self._submit_errors: list = []
        self._r.on_deferred_error = self._submit_errors.append
        self._results = Results(self, url)  # reading results: its own connection (BLMPOP)
        # results from task processes on this machine come straight here (miniray.values.inbox)
        # a kept job's results go through the server (the inbox dies with this process)
        self._keep = max(1, round(s.keep_grace_seconds)) if keep else None
        self._sealed = False
        self._inbox = Inbox.open() if s.direct_results and not keep else None
        # large values to and from task processes on this machine: shared memory (values.shm);
        # arguments only while the server and every worker are on this machine (no worker
        # elsewhere could read them), or where the user says so (MINIRAY_SHM=2)
        self._shm = Segments.open(s.shm_min_bytes) if s.shm and not keep else None
        self._shm_args = None if self._shm is None else ArgumentsHere(
            s.shm == 2, self._local is not None or url.startswith("unix:"),
            lambda: [w.get("shm") for w in self.workers()])
        self._delivery = Delivery(self)  # what a result message settles
        self._broker = Broker(self._r, s.namespace)
        self.keys = self._broker.keys
        self._lock = threading.Lock()  # guards _refs, the outbox's queue and the job's state
        self._wakeup = threading.Condition(self._lock)
        self._outbox = Outbox(self)  # submission: chunks not sent yet, the flusher thread
        self._refs: dict = {}  # chunk id -> its outbox._Ref, from enqueue until it ends
        self._next_task = 0  # task ids: submit order, and a map item's position
        # this job's items that ended done and failed (the rest of its items, once all have
        # ended, were cancelled): the client settles every item, so its tally is the one
        # written to the job's counters when it ends (see JobLifecycle.final_counts)
        self._tally = [0, 0]
        self._n_items = 0  # this job's items submitted
        self._shutdown = False
        self._broken: BaseException | None = None
        # cancel() or `miniray cancel`: the job stays "cancelled", and the next submission
        # starts a new job
        self._job_cancelled = False
        self._feeds: "weakref.WeakSet" = weakref.WeakSet()  # map_futures' feeders (feeding)
        if initializer is not None and not callable(initializer):
            raise TypeError("initializer must be a callable")
        self._init_sha = (self._outbox.function(functools.partial(initializer, *initargs))
                          if initializer is not None else None)
        self._lifecycle.create()
        self._outbox.start()
        self._results.start()
        _live_executors.add(self)

    def __repr__(self) -> str:
        state = "shut down" if self._shutdown else "open"
        return (f"<miniray.Executor job={self.job_name!r} priority={self.priority} "
                f"{state} pending={len(self._refs)} server={_redact(self.redis_url)}>")

    # -- submission --------------------------------------------------------------------------
    def submit(self, fn, /, *args, **kwargs) -> MinirayFuture:
        """Schedule ``fn(*args, **kwargs)``; returns a Future for its result."""
        self._check_open()
        sha = self._outbox.function(fn)
        frames = dumps_call(args, kwargs)
        task = self._take_task_ids(1)
        future = MinirayFuture(self, task)
        self._outbox.enqueue(sha, task, 1, frames, future, is_map=False)
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
        sha = self._outbox.function(fn)
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
        self._outbox.enqueue(sha, start, len(batch), frames, future, is_map=True)
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
        sha = self._outbox.function(fn)
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
        chunk._items = mine  # (they run when the chunk does: see Results.mark_running)
        # what add_done_callback does, without its lock and its _want per chunk: the chunk
        # is new and unsent (nobody else can settle it), and enqueue asks for deliveries
        chunk._wanted = True
        chunk._done_callbacks.append(_split_own)
        self._outbox.enqueue(sha, start, len(batch), frames, chunk, is_map=True)
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
            self._lifecycle.renew()

    def seal(self, timeout: float = 60.0) -> None:
        """No more work for this (kept) job: once everything submitted has been sent, the
        cluster records how many items it has, and ends the job (``done``) when they all have,
        whether this process still lives or not. Later submissions raise."""
        self._lifecycle.seal(timeout)

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
            self._lifecycle.tell_server(first, cancel_futures)
        else:  # a server that hangs (SIGSTOP) must not hold a caller that does not wait, the
            # interpreter's exit among them (atexit): what it has not heard by then, it hears
            # from the threads left behind if it answers again
            t = threading.Thread(target=self._lifecycle.tell_server,
                                 args=(first, cancel_futures), daemon=True,
                                 name=f"miniray-shutdown-{self.client_id}")
            t.start()
            t.join(_NO_WAIT_SECONDS)
        self._results.poke()
        if wait:
            self._results.want_delivery()  # what is still pending must come in without a caller
            self._outbox.thread.join()
            self._results.thread.join()
            _cache.flush_for(self)  # results of a cache=True map are stored (bounded)

    def cancel(self) -> int:
        """Cancel the whole job now: queued tasks are dropped and running ones interrupted
        (SIGINT, then killed). Their futures are cancelled, running ones included (what a
        ``map_futures`` chunk delivered before stays in its items' futures); the job's
        counters then say what the futures say. Returns how many chunks were pending.
        The executor stays usable: what is submitted next runs as a new job."""
        return self._lifecycle.cancel()

    # -- observation (the notebook face uses these) ------------------------------------------
    def progress(self) -> dict:
        """This job's item counters (queued, running, done, failed, cancelled), ``state``,
        ``status`` (in words) and more: see ``miniray.client.observe.job_progress``."""
        self._delivery.await_reports()
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
        self._delivery.await_reports()
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
            self._delivery.await_reports()  # the last lines come before the last reports
            return True
        return finished


def _check_chunksize(chunksize) -> None:
    if not isinstance(chunksize, int) or isinstance(chunksize, bool) or chunksize < 1:
        raise ValueError("chunksize must be >= 1.")


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
