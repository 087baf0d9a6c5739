"""How outcomes reach the executor's futures where a plain ``set_result`` is not enough: a
cancelled job (running futures end cancelled too, what a chunk delivered stays with its
items), a map's chunks stopped by Ctrl-C (``stop_chunks``), and where and when each
``map_futures`` item ran and what it ended with (``place``, ``split_chunk``)."""

from __future__ import annotations

from concurrent.futures import Future

from miniray.errors import JobCancelledError
from miniray.resp import RedisError

__all__ = ["MISSING", "cancel_future", "force_cancel", "failures", "cancel_ref", "place",
           "split_chunk", "split_own", "stop_chunks"]

MISSING = object()  # a map chunk's value not delivered yet


def cancel_future(fut: Future) -> bool:
    """Cancel ``fut`` and tell its waiters: ``wait()`` and ``as_completed()`` only hear of a
    cancellation through ``set_running_or_notify_cancel``, as executors do it."""
    if not Future.cancel(fut):
        return False
    with fut._condition:
        notified = fut._state == "CANCELLED_AND_NOTIFIED"
    if not notified:
        fut.set_running_or_notify_cancel()
    return True


def force_cancel(fut: Future) -> bool:
    """Cancel ``fut`` even if it runs (its job was cancelled: the task is interrupted)."""
    with fut._condition:
        if fut._state == "RUNNING":
            fut._state = "PENDING"
    return cancel_future(fut)


def failures(errors) -> int:
    """How many of these item errors are failures (a cancelled job's are cancellations)."""
    return sum(1 for e in errors if not isinstance(e, JobCancelledError))


def cancel_ref(ref) -> None:
    """Cancel a chunk's future (an executor's ``outbox._Ref``); the items of a ``map_futures``
    chunk that had delivered keep their outcome."""
    items = getattr(ref.future, "_items", None)
    values = ref.values
    if items is not None and values is not None:
        errors = ref.errors or {}
        for i, v in enumerate(values):
            if v is MISSING:
                continue
            try:
                if i in errors:
                    if isinstance(errors[i], JobCancelledError):
                        force_cancel(items[i])
                    else:
                        items[i].set_exception(errors[i])
                else:
                    items[i].set_result(v)
            except Exception:  # (settled meanwhile)
                pass
    force_cancel(ref.future)


def stop_chunks(ex, futures: list) -> None:
    """Stop the chunks of these futures (a ``map`` abandoned by Ctrl-C while other futures of
    the executor ``ex`` are pending): those not sent yet are dropped here, the queued ones
    withdrawn and those a worker holds stopped (``Broker.stop_chunks``: the worker interrupts
    or drops them, their items count as cancelled), all in one call to the server. Their
    futures end cancelled at once, running ones included; a result that comes later for one
    of them finds no chunk and is ignored. A chunk that had finished keeps its outcome (its
    result is on its way). The executor's other futures go on."""
    refs, sent = [], []
    for f in futures:
        ref = getattr(f, "_ref", None)
        if ref is None or Future.done(f):  # (settled: its outcome stays)
            continue
        if not ref.sent and ex._outbox.withdraw(ref):  # (only local: it never reached the server)
            refs.append(ref)
        elif ref.sent:
            sent.append(ref)
    if sent:
        try:
            stopped = ex._broker.stop_chunks(ex.job_id, [r.entry for r in sent],
                                             ex._settings.event_stream_maxlen)
        except RedisError:
            stopped = set()  # the server is gone: the futures fail with the executor
        with ex._lock:
            for r in sent:
                if r.chunk in stopped and ex._refs.pop(r.chunk, None) is r:
                    refs.append(r)
    for r in refs:
        cancel_ref(r)
    if refs:
        ex._results.wake()


def place(items: list, indices, worker, host, slot, times) -> None:
    """Tell the futures of a ``map_futures`` chunk's items that came in where they ran and,
    when known, when (``times``: (start, end) per index, see ``protocol.item_times``)."""
    for k, i in enumerate(indices):
        f = items[i]
        if f.worker is None:  # (the first outcome of an item is the one it keeps)
            f.worker, f.host, f.slot = worker, host, slot
            if times is not None:
                f._times = times[k]  # (start, end): see MinirayFuture.started_at


def split_own(chunk: Future) -> None:
    """A ``map_futures`` chunk's done-callback: ``split_chunk`` to its own items."""
    split_chunk(chunk, chunk._items)


def split_chunk(chunk: Future, items: list) -> None:
    """Hand a finished map chunk's outcome to its items' futures (``map_futures``)."""
    if chunk.cancelled():
        for f in items:
            force_cancel(f)  # (running ones too: the job was cancelled)
        return
    exc = chunk.exception()
    values, errors = (None, None) if exc is not None else chunk.result()
    for i, f in enumerate(items):
        if f.worker is None:
            f.worker, f.host = chunk.worker, chunk.host
        try:
            err = exc if exc is not None else errors.get(i) if errors else None
            if isinstance(err, JobCancelledError):  # interrupted by the job's cancel
                force_cancel(f)
            elif err is not None:
                f._rerun = chunk._rerun  # (its own argument: the item's task_id picks it)
                f.set_exception(err)
            else:
                f.set_result(values[i])
        except Exception:  # the item's future was cancelled meanwhile
            pass
