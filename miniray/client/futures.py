"""The futures an ``Executor`` returns: ``MinirayFuture`` (one per ``submit`` and per map
chunk) and the light item futures of ``map_futures``.

A ``MinirayFuture`` settles as ``concurrent.futures`` says; what it adds is where its result
comes from: a thread waiting in ``result()`` reads results itself (``Results.read_until``)
while nobody else does, and anything that waits without reading (``wait``, ``as_completed``,
callbacks, ``done()`` polls) asks the executor's results thread to deliver (``_want``).
"""

from __future__ import annotations

import threading
import weakref
from concurrent.futures import Future
from typing import TYPE_CHECKING

from miniray.protocol import item_times

from .outcomes import cancel_future as _cancel
from .rerun import rerun_locally as _rerun_locally

if TYPE_CHECKING:
    from .executor import Executor

__all__ = ["MinirayFuture"]

_WAITING = ("PENDING", "RUNNING")


class _Waiters(list):
    """A future's waiters (``wait`` and ``as_completed`` add theirs): a waiter that is added
    asks the executor to deliver results from its thread (nobody else may be reading)."""

    __slots__ = ("future",)

    def __init__(self, future: "MinirayFuture"):
        super().__init__()
        self.future = weakref.ref(future)  # (not a cycle: a dropped future frees its result)

    def append(self, waiter) -> None:
        super().append(waiter)
        future = self.future()
        if future is not None:
            future._want()


class MinirayFuture(Future):
    """A ``concurrent.futures.Future`` that knows its task: ``task_id``, ``job``; once it
    has run, ``worker`` (its id), ``host`` and ``slot`` (the worker's slot index; None for an
    outcome the worker itself reported, e.g. a crash), and ``started_at``/``finished_at``
    (epoch seconds on the worker's clock, for a ``submit`` and each ``map_futures`` item;
    None when unknown: a crash, a cancel, a plain ``map``'s chunk). ``cached`` is True for
    an item of a ``map_futures(..., cache=True)`` whose result came from the item cache (it
    did not run; its ``task_id`` is None).

    A thread that waits in ``result()`` or ``exception()`` reads the results itself while no
    other thread does (no hand-off from a results thread on the latency path); callbacks,
    ``wait``, ``as_completed``, ``done()`` and ``shutdown`` have the executor's results thread
    deliver instead. Either way the future behaves as ``concurrent.futures`` says.
    """

    _rerun = None  # a failed task's payload, to re-run it here (see miniray.client.rerun)
    cached = False

    def __init__(self, executor: "Executor | None" = None, task_id: int | None = None):
        super().__init__()
        self._executor = executor
        self._ref = None
        self._wanted = False  # someone waits for it without reading (see _want)
        self._waiters = _Waiters(self)
        self.task_id = task_id
        self.job = executor.job_id if executor is not None else None
        self.worker = None
        self.host = None
        self.slot = None
        self._times = None  # the worker's timing: its bytes, read on demand, or (start, end)

    @property
    def started_at(self) -> float | None:
        """When the task started on its worker (epoch seconds on its clock), or None."""
        return self._when()[0]

    @property
    def finished_at(self) -> float | None:
        """When the task ended on its worker (epoch seconds on its clock), or None."""
        return self._when()[1]

    def _when(self) -> tuple:
        t = self._times
        if t is None:
            return None, None
        if type(t) is bytes:  # (decoded when asked: not on every result's path)
            pairs = item_times(t, 1)
            t = self._times = pairs[0] if pairs else (None, None)
        return t

    def _want(self) -> None:
        """Someone will wait for this future without reading results: the executor's results
        thread delivers them."""
        self._wanted = True
        if self._executor is not None and self._state in _WAITING:
            self._executor._results.want_delivery()

    def result(self, timeout: float | None = None):
        if self._state in _WAITING and self._executor is not None:
            timeout = self._executor._results.read_until(self, timeout)
        return super().result(timeout)

    def exception(self, timeout: float | None = None):
        if self._state in _WAITING and self._executor is not None:
            timeout = self._executor._results.read_until(self, timeout)
        return super().exception(timeout)

    def done(self) -> bool:
        done = super().done()
        if not done and not self._wanted:
            self._want()  # polled: it must complete without a result() call
        return done

    def add_done_callback(self, fn) -> None:
        if not self._wanted:
            self._want()
        super().add_done_callback(fn)

    def cancel(self) -> bool:
        """Cancel the task if no worker has taken it yet (as with ProcessPoolExecutor)."""
        with self._condition:
            if self._state != "PENDING":
                return self._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED")
        ex, ref = self._executor, self._ref
        if ex is not None and ref is not None and not ex._outbox.withdraw(ref):
            # a worker holds it: it is running now, as far as the contract goes
            self.set_running_or_notify_cancel_safe()
            return False
        cancelled = _cancel(self)
        if cancelled and ex is not None:
            ex._results.wake()  # a thread reading for this future stops waiting
        return cancelled

    def set_running_or_notify_cancel_safe(self) -> None:
        with self._condition:
            if self._state == "PENDING":
                self._state = "RUNNING"

    def rerun_locally(self):
        """Re-run this failed task here, in this process, with the same function and the
        same argument(s) as they travelled (unpickled from what was sent), and raise its
        exception here with a traceback through your function, so that ``%debug`` or
        ``pdb.pm()`` can step through it (like Dask's ``recreate_error_locally``).

        The worker's limits do not apply here (no timeout, memory or CPU limit, no GPUs
        assigned, no job ``env``, no initializer). Raises ``RerunError`` when the future is
        not done, did not fail, was cancelled, or its arguments (kept up to
        ``MINIRAY_RERUN_KEEP_BYTES``) or function (``fn:{sha}`` on the cluster, kept for
        ``MINIRAY_FUNCTION_TTL_SECONDS``) are gone. If the task does not fail here, its value
        is returned with a ``RerunSucceededWarning``.

        >>> f = ex.submit(parse, "x")                                   # doctest: +SKIP
        >>> f.rerun_locally()                                           # doctest: +SKIP
        Traceback (most recent call last): ... ValueError: ...
        >>> import pdb; pdb.pm()                                        # doctest: +SKIP
        """
        return _rerun_locally(self)


class _Lazy:
    """An attribute made when first used (a non-data descriptor: once made it is the
    instance's own). Most ``map_futures`` items are only ever settled, so submitting
    100,000 of them makes no locks and no lists."""

    def __init__(self, make):
        self.make = make

    def __set_name__(self, owner, name):
        self.name = name

    def __get__(self, obj, cls=None):
        if obj is None:
            return self
        return obj.__dict__.setdefault(self.name, self.make())  # (atomic: one wins)


class _ItemFuture(MinirayFuture):
    """One ``map_futures`` item: settled by its chunk's future (see ``outcomes.split_chunk``), made
    without running ``__init__`` (see ``_item_futures``): what every new future holds is a
    class attribute until it is set, its lock and lists are made when first used, and it
    has no executor to ask for deliveries (its chunk's future does), so a plain list holds
    its waiters."""

    _condition = _Lazy(threading.Condition)
    _waiters = _Lazy(list)
    _done_callbacks = _Lazy(list)
    _state, _result, _exception = "PENDING", None, None
    _executor = _ref = worker = host = slot = _times = None
    _wanted = False


def _item_futures(job: str, start: int, n: int) -> list:
    """``n`` item futures for task ids ``start``..., as cheaply as Python allows."""
    new, out = _ItemFuture.__new__, []
    for task in range(start, start + n):
        f = new(_ItemFuture)
        f.task_id, f.job = task, job
        out.append(f)
    return out
