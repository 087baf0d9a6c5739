"""How outcomes reach the executor's futures where a plain ``set_result`` is not enough: a
cancelled job (running futures end cancelled too, what a chunk delivered stays with its
items), and where and when each ``map_futures`` item ran."""

from __future__ import annotations

from concurrent.futures import Future

from .errors import JobCancelledError

__all__ = ["MISSING", "cancel_future", "force_cancel", "failures", "cancel_ref", "place"]

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
    """Cancel a chunk's future (an executor's ``_Ref``); the items of a ``map_futures``
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


def place(items: list, indices, worker, host, slot, times) -> None:
    """Tell the futures of a ``map_futures`` chunk's items that came in where they ran and,
    when known, when (``times``: (start, end) per index, see ``protocol.item_times``)."""
    for k, i in enumerate(indices):
        f = items[i]
        if f.worker is None:  # (the first outcome of an item is the one it keeps)
            f.worker, f.host, f.slot = worker, host, slot
            if times is not None:
                f._times = times[k]  # (start, end): see MinirayFuture.started_at
