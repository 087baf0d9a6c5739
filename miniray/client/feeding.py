"""Feeding a map's input to the cluster: the ordered results of ``Executor.map`` (eager, or
lazy and bounded with ``buffersize``, as Python 3.14's ``Executor.map``) and the futures of
``Executor.map_futures(..., buffersize=N)``, fed from a thread, so that an endless input runs
in flat client and server memory.

::

    map(buffersize=N):  input --[the caller's thread, as it takes results]--> <= N chunks
    map_futures(buffersize=N):  input --[feeder thread]--> <= N unfinished chunks
                                           \\--> FutureStream (futures, in item order)

``buffersize`` counts chunks (``chunksize`` items each), as ``ProcessPoolExecutor.map`` counts
them in Python 3.14: with ``map`` at most ``buffersize`` chunks are submitted and not yet
yielded each time a result is yielded; each chunk yielded whole lets the next one be read.
"""

from __future__ import annotations

import collections
import itertools
import threading
import time
from concurrent.futures import TimeoutError as FuturesTimeout

__all__ = ["check_buffersize", "batches", "ordered_results", "MapResults", "FutureStream"]

# a map over one of these is cut into chunks by slicing (no item passes through Python code)
_SLICED = (list, tuple, range)

# a map's values of these types are yielded straight from their chunk's list (see
# MapResults): none refers to another object, so none can keep anything alive
_ATOMS = frozenset((int, float, bool, complex, type(None)))


def check_buffersize(buffersize) -> None:
    """Python 3.14's checks and exception types, with what to give instead."""
    if buffersize is not None and not isinstance(buffersize, int):
        raise TypeError(f"buffersize must be an integer or None, not "
                        f"{type(buffersize).__name__}: it is how many chunks may be submitted "
                        "and not yet yielded (e.g. buffersize=64)")
    if buffersize is not None and buffersize < 1:
        raise ValueError(f"buffersize must be None or > 0, not {buffersize}: it is how many "
                         "chunks may be submitted and not yet yielded (None: no bound, the "
                         "whole input is read at once)")


def batches(iterables: tuple, chunksize: int):
    """``(kind, items)`` per chunk: one iterable's items travel bare ("m1"), several
    iterables' as argument tuples ("m")."""
    if len(iterables) == 1 and type(iterables[0]) in _SLICED:
        src, at = iterables[0], 0
        while at < len(src):  # (read as it goes, as an iterator would: it may grow)
            batch = src[at : at + chunksize]
            yield "m1", batch if type(batch) is list else list(batch)
            at += chunksize
        return
    if len(iterables) == 1:
        kind, items = "m1", iter(iterables[0])
    else:
        kind, items = "m", zip(*iterables)
    while True:
        batch = list(itertools.islice(items, chunksize))
        if not batch:
            return
        yield kind, batch


class _Stopped(Exception):
    """The executor refused the next chunk (its ``RuntimeError`` is the cause)."""


def _stopped(why) -> RuntimeError:
    return RuntimeError(
        f"the input was not all submitted ({why}): the executor stopped taking work while a "
        "map with buffersize was still reading it, so only the items read so far ran; "
        "iterate to the end before shutdown() or cancel()")


def ordered_results(futures: collections.deque, deadline: float | None, more=None):
    """Map results in order (a ``MapResults``); the first error raises when its element is
    reached.

    ``more()``, when given, submits the next chunk and returns its future (None when the
    input is exhausted): it is called once per chunk taken, before that chunk is waited for,
    as Python 3.14's ``Executor.map`` does with ``buffersize``. Like ``concurrent.futures``,
    it keeps no reference to a result it has yielded; on close, error or timeout the chunks
    not yielded are cancelled (queued ones are withdrawn from the server)."""
    return MapResults(futures, deadline, more)


class MapResults:
    """The iterator ``Executor.map`` returns: its values, in order, with ``close()``.

    Iterating it (``list(...)``, ``for``) runs at C speed through the values of each
    chunk: ``iter()`` gives an ``itertools.chain`` over the chunks' values (one per
    ``MapResults``: ``next()`` on either moves both). A chunk of numbers (no values that
    could hold anything) is its own list; any other chunk comes out through a stack that
    drops each value as it is yielded (CPython issue #14406), up to its first error, which
    is raised when reached. ``close()`` (and dropping the iterator) cancels the chunks not
    yielded and ends the iteration at once, the current chunk's values included.
    """

    __slots__ = ("_chunks", "_items", "_current", "__weakref__")

    def __init__(self, futures: collections.deque, deadline: float | None, more=None):
        self._current: list = [None]  # the list being iterated now (see close)
        self._chunks = _chunk_values(futures, deadline, more, self._current)
        self._items = itertools.chain.from_iterable(self._chunks)

    def __iter__(self):
        return self._items

    def __next__(self):
        return next(self._items)

    def close(self) -> None:
        """Cancel what was submitted and not yielded; the iteration ends here."""
        now = self._current[0]
        if now is not None:  # the chunk's list, or its stack: either ends when empty
            self._current[0] = None
            now.clear()
        self._chunks.close()


def _chunk_values(futures: collections.deque, deadline: float | None, more, current: list):
    """Per chunk taken, in order, an iterable of its values (see ``MapResults``)."""
    stopped = None
    try:
        while futures:
            if more is not None:
                try:
                    nxt = more()
                except _Stopped as e:  # shut down: what is buffered still comes out
                    nxt, stopped = None, e.__cause__
                if nxt is None:
                    more = None
                else:
                    futures.append(nxt)
            f = futures.popleft()
            try:
                if deadline is None:
                    values, errors = f.result()
                else:
                    values, errors = f.result(max(0.0, deadline - time.monotonic()))
            except KeyboardInterrupt:
                futures.appendleft(f)
                if f._executor is not None:
                    f._executor._interrupt_map(list(futures))
                raise
            except BaseException:
                futures.appendleft(f)  # still pending (timeout): cancelled below
                raise
            f._result = f._ref = None
            del f
            if not errors and _ATOMS.issuperset(map(type, values)):
                # numbers: nobody can tell whether we still hold one, so the list itself
                current[0] = values
                yield values
                continue
            hit = [i for i in errors if 0 <= i < len(values)] if errors else ()
            upto = min(hit) if hit else len(values)
            stack = values[:upto] if upto < len(values) else values
            stack.reverse()  # popped from its end: each value leaves it as it is yielded
            values = None
            current[0] = stack
            # (no sentinel: comparing a value with one may raise, as a numpy array's does)
            yield map(list.pop, itertools.takewhile(len, itertools.repeat(stack)))
            current[0] = stack = None
            if hit:
                raise errors[upto]
        if stopped is not None:
            raise _stopped(stopped) from stopped
    except FuturesTimeout:
        raise FuturesTimeout() from None
    finally:
        current[0] = None
        for f in futures:
            f.cancel()


def _refuses(ex) -> str | None:
    """Why ``ex`` takes no more of a map's input, if it does not."""
    if ex._shutdown:
        return "the executor was shut down"
    if ex._sealed:
        return f"job {ex.job_id} was sealed"
    if ex._job_cancelled:
        return f"job {ex.job_id} was cancelled"
    return None


def lazy_map(executor, submit_chunk, iterables: tuple, chunksize: int, buffersize: int,
             deadline: float | None):
    """``Executor.map(..., buffersize=N)``: the first ``N`` chunks are submitted now, the
    next one each time a chunk is taken (the input is read no further than that)."""
    source = batches(iterables, chunksize)
    futures = collections.deque(submit_chunk(kind, batch)
                                for kind, batch in itertools.islice(source, buffersize))
    def more():  # (a strong reference, unlike CPython's: our futures hold the executor)
        why = _refuses(executor)
        if why:  # (before reading: no item is read that cannot be sent)
            raise _Stopped() from RuntimeError(why)
        step = next(source, None)  # (the input's own errors go to the caller as they are)
        if step is None:
            return None
        try:
            return submit_chunk(*step)
        except RuntimeError as e:  # the executor takes no more work (shutdown, seal)
            raise _Stopped() from e

    return ordered_results(futures, deadline, more)


class FutureStream:
    """``map_futures(..., buffersize=N)``: an iterator of one future per item, in item order,
    created as a feeder thread reads the input. The feeder keeps at most ``N`` chunks
    unfinished on the cluster and at most ``N`` chunks' futures waiting here to be taken, so
    neither side's memory grows with the input. ``close()`` (or leaving a ``with`` block)
    stops the feeding and cancels the futures not done; so do the executor's ``shutdown``,
    ``cancel()`` and a job cancelled elsewhere. Iterating past the last future made after the
    feeding was stopped by the executor raises ``RuntimeError`` (input was left unread);
    an error raised by the input itself is raised there too.

    >>> for f in ex.map_futures(parse, open_lines(), buffersize=64):   # doctest: +SKIP
    ...     handle(f.result())
    """

    def __init__(self, executor, submit_chunk, iterables: tuple, chunksize: int,
                 buffersize: int):
        self._cond = threading.Condition()
        self._ready: collections.deque = collections.deque()  # per chunk: its item futures
        self._chunks: set = set()  # chunk futures not finished (we cancel them on close)
        self._bound = buffersize
        self._closed = False  # by the user: the iteration just ends
        self._stop: BaseException | None = None  # by the executor, or the input's error
        self._fed = False  # the feeder has ended
        self._executor = executor
        self._thread = threading.Thread(
            target=self._feed, args=(submit_chunk, batches(iterables, chunksize)),
            daemon=True, name=f"miniray-feed-{executor.client_id}")
        executor._feeds.add(self)
        self._thread.start()

    def _feed(self, submit_chunk, source) -> None:
        cond = self._cond
        try:
            while True:
                with cond:
                    while (len(self._chunks) >= self._bound or len(self._ready) >= self._bound
                           ) and not self._closed and self._stop is None:
                        cond.wait()
                    if self._closed or self._stop is not None:
                        return
                why = _refuses(self._executor)
                if why:  # (before reading: no item is read that cannot be sent)
                    raise _Stopped() from RuntimeError(why)
                step = next(source, None)  # (the input's own error is raised as it is)
                if step is None:
                    return
                try:
                    chunk, items = submit_chunk(*step)
                except RuntimeError as e:  # the executor takes no more (shutdown, seal)
                    raise _Stopped() from e
                with cond:
                    closed = self._closed
                    if not closed:
                        self._chunks.add(chunk)
                        self._ready.append(collections.deque(items))
                        cond.notify_all()
                if closed:  # closed while it was being sent: nobody will take it
                    chunk.cancel()
                    return
                chunk.add_done_callback(self._chunk_done)
        except BaseException as e:  # refused, server lost, an item that cannot be pickled,
            with cond:              # the input's own error: raised after the last future
                if self._stop is None and not self._closed:
                    self._stop = e
        finally:
            with cond:
                self._fed = True
                cond.notify_all()

    def _chunk_done(self, chunk) -> None:
        with self._cond:
            self._chunks.discard(chunk)
            self._cond.notify_all()

    def stop(self, why: str) -> None:
        """The executor stops the feeding (shutdown, cancel): at once, no more input is read
        after the chunk being submitted now."""
        with self._cond:
            if self._stop is None and not self._closed:
                self._stop = _Stopped()
                self._stop.__cause__ = RuntimeError(why)
            self._cond.notify_all()

    def close(self) -> None:
        """Stop feeding; the futures not done are cancelled (queued chunks are withdrawn)."""
        with self._cond:
            self._closed = True
            chunks = list(self._chunks)
            ready, self._ready = self._ready, collections.deque()
            self._cond.notify_all()
        for chunk in chunks:
            chunk.cancel()
        for items in ready:
            for f in items:
                f.cancel()

    def __enter__(self) -> "FutureStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self):
        return self

    def __next__(self):
        with self._cond:
            while True:
                if self._closed:
                    raise StopIteration
                if self._ready:
                    items = self._ready[0]
                    f = items.popleft()
                    if not items:
                        self._ready.popleft()
                        self._cond.notify_all()
                    return f
                if self._fed:
                    if self._stop is not None:
                        err, self._stop = self._stop, None
                        self._closed = True
                        if isinstance(err, _Stopped):
                            raise _stopped(err.__cause__) from err.__cause__
                        raise err
                    raise StopIteration
                self._cond.wait()
