"""One running ``%%miniray map``: its executor, item futures, progress model, logs and view.

A ``MapRun`` is also the handle ``--bg`` returns: ``result()``, ``results()``, ``progress()``,
``cancel()``, ``done()``, ``wait()``, ``logs()``, ``timings()``; it displays as the live widget.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError
from typing import NamedTuple
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures import wait as wait_futures

import miniray

from .display import make_view
from .logs import LogBuffer
from .progress import MapProgress

__all__ = ["MapRun", "MISSING", "Timing"]

#: what ``results()`` puts in place of an item that failed or never ran (cancelled)
MISSING = None

_UPDATE_SECONDS = 0.1  # the view is refreshed at most ~10 times a second
_WORKERS_SECONDS = 1.0  # heartbeats come once a second; polling faster shows nothing new
_IDLE_WAIT_SECONDS = 4.0  # after a cancel: the most the view waits for the lanes to go idle


def _without_job(worker: dict, job: str) -> dict:
    """A heartbeat with the slots it shows on ``job`` idle (the job has ended)."""
    jobs = worker.get("jobs") or []
    mine = sum(1 for j in jobs if j == job)
    if not mine:
        return worker
    return {**worker, "busy": max(0, worker.get("busy", 0) - mine),
            "jobs": [j for j in jobs if j != job]}


class Timing(NamedTuple):
    """When and where one item ran: epoch seconds measured on its worker (``slot``: the
    worker's slot index; an item ends where the slot's next item starts)."""

    item: int
    worker: str
    slot: int | None
    start: float
    end: float


class MapRun:
    """Run ``fn`` over ``items`` as one miniray job and watch it.

    >>> run = MapRun(lambda x: x * 2, range(10), job_name="double")   # doctest: +SKIP
    >>> run.result()                                                  # doctest: +SKIP
    [0, 2, 4, ...]
    """

    def __init__(self, fn, items, *, redis_url=None, job_name=None, priority=1, limits=None,
                 chunksize=1, view=None, cancel_button=False, start=True):
        items = list(items)
        self.executor = miniray.Executor(redis_url=redis_url, job_name=job_name,
                                         priority=priority, limits=limits)
        self.job = self.executor.job_id
        self.name = self.executor.job_name
        self.model = MapProgress(len(items), self.name, job=self.job)
        self.log_buffer = LogBuffer()
        self.view = make_view(self.model, self.log_buffer,
                              on_cancel=self.cancel if cancel_button else None, kind=view)
        self._finished = threading.Event()
        self._cancel_requested = False
        self._fn, self._items, self._chunksize = fn, items, chunksize
        self.futures: list = []
        self._started = False
        if start:
            self.start()

    def start(self) -> "MapRun":
        """Submit every item and start the live updates (``start=False`` defers this, so a
        view can be displayed before anything runs)."""
        if self._started:
            return self
        self._started = True
        self.model.started = time.monotonic()
        # follow the logs from the first line on, before anything can print
        self._log_thread = threading.Thread(target=self._follow_logs, daemon=True,
                                            name=f"miniray-logs-{self.job}")
        self._log_thread.start()
        fn, items, self._fn, self._items = self._fn, self._items, None, None
        try:
            self.futures = self.executor.map_futures(fn, items, chunksize=self._chunksize)
        except BaseException:
            self.executor.shutdown(wait=False, cancel_futures=True)
            self._finish()
            raise
        if not self.futures:
            self._finish()
        for i, f in enumerate(self.futures):
            f.add_done_callback(lambda f, i=i: self._item_done(i, f))
        self._updater = threading.Thread(target=self._update_loop, daemon=True,
                                         name=f"miniray-view-{self.job}")
        self._updater.start()
        return self

    # -- feeding the model -----------------------------------------------------------------
    def _item_done(self, index: int, fut) -> None:
        if fut.cancelled():
            last = self.model.item_finished(index, cancelled=True)
        else:
            last = self.model.item_finished(index, fut.exception(), host=fut.host,
                                            worker=fut.worker)
        if last:
            self._finish()

    def _follow_logs(self) -> None:
        try:
            for line in self.executor.logs(follow=True):
                self.log_buffer.add(line)
        except Exception:  # the server went away (e.g. %miniray down): the log simply ends
            pass

    def _finish(self) -> None:
        self.model.finish(cancelled=self._cancel_requested)
        self._finished.set()

    def _update_loop(self) -> None:
        next_workers = 0.0
        ex = self.executor
        while not self._finished.is_set():
            try:
                self.model.server_counts(ex.progress())
                if time.monotonic() >= next_workers:
                    self.model.set_workers(ex.workers())
                    next_workers = time.monotonic() + _WORKERS_SECONDS
            except Exception:  # a view must never break the run; the futures carry errors
                pass
            self._render()
            self._finished.wait(_UPDATE_SECONDS)
        try:
            self.model.set_workers(ex.workers())
        except Exception:
            pass
        ex.shutdown(wait=False)  # log following ends once the job has no work left
        deadline = time.monotonic() + 3.0
        while self._log_thread.is_alive() and time.monotonic() < deadline:
            self._render()
            self._log_thread.join(_UPDATE_SECONDS)
        # the lanes end as the workers are now: after a cancel, the heartbeats that show the
        # interrupted tasks gone (a few seconds at most); every item has ended, so a slot a
        # heartbeat still shows on this map (sent before its last item ended) is idle
        deadline = time.monotonic() + (_IDLE_WAIT_SECONDS if self._cancel_requested else 0)
        while True:
            try:
                workers = ex.workers()
            except Exception:
                break
            if time.monotonic() >= deadline or not any(self.job in (w.get("jobs") or ())
                                                       for w in workers):
                self.model.set_workers([_without_job(w, self.job) for w in workers])
                break
            self.model.set_workers(workers)
            self._render()
            time.sleep(_WORKERS_SECONDS / 4)
        self._render()
        self.view.finish()

    def _render(self) -> None:
        try:
            self.view.render()
        except Exception:
            pass

    # -- the handle --------------------------------------------------------------------------
    def done(self) -> bool:
        return self._finished.is_set()

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every item has finished (or ``timeout``); interruptible by Ctrl-C."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._finished.is_set():
            step = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
            if step <= 0:
                return False
            self._finished.wait(step)
        return True

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until the view has rendered its final state (logs included)."""
        if self._started:
            self._updater.join(timeout)

    def cancel(self) -> int:
        """Cancel the job: queued items are dropped, running ones interrupted (SIGINT, then
        killed). Items already finished keep their results. Returns how many chunks were
        pending."""
        self._cancel_requested = True
        n = self.executor.cancel()
        wait_futures(self.futures, timeout=5)
        self._finish()
        return n

    @property
    def cancelled(self) -> bool:
        return self.model.state == "cancelled"

    def results(self, missing=MISSING) -> list:
        """The results in item order so far; ``missing`` for failed, cancelled or pending
        items."""
        out = []
        for f in self.futures:
            if f.done() and not f.cancelled() and f.exception() is None:
                out.append(f.result())
            else:
                out.append(missing)
        return out

    @property
    def errors(self) -> dict:
        """``{item index: exception}`` of the items that failed."""
        return {i: f.exception() for i, f in enumerate(self.futures)
                if f.done() and not f.cancelled() and f.exception() is not None}

    def first_error(self) -> BaseException | None:
        errors = self.errors
        return errors[min(errors)] if errors else None

    def result(self, timeout: float | None = None) -> list:
        """Wait, then the results in item order; raises the first item's error (as its own
        type, the worker's traceback chained) or ``CancelledError`` if it was cancelled."""
        if not self.wait(timeout):
            raise FuturesTimeout(f"map {self.name!r} still running after {timeout}s")
        err = self.first_error()
        if err is not None:
            raise err
        if self.cancelled:
            raise CancelledError(f"map {self.name!r} was cancelled; .results() has what finished")
        return self.results()

    def progress(self) -> dict:
        """Counts and state: total, done, failed, cancelled, running, queued, rate, eta."""
        s = self.model.snapshot()
        return {k: s[k] for k in ("state", "total", "done", "failed", "cancelled", "running",
                                  "queued", "rate", "eta", "elapsed")}

    def timings(self) -> list:
        """``Timing(item, worker, slot, start, end)`` of every finished item (done or failed),
        in item order: for stragglers, per-slot timelines, a DataFrame
        (``pandas.DataFrame(run.timings())``). Items that were cancelled or whose task
        process died have none."""
        return [Timing(i, f.worker, f.slot, f.started_at, f.finished_at)
                for i, f in enumerate(self.futures)
                if f.done() and not f.cancelled() and f.started_at is not None]

    def logs(self, worker: str | None = None, last: int = 200) -> list:
        """The latest captured log lines (``miniray.LogLine``) of this map."""
        return self.log_buffer.lines(worker, last)

    def summary(self) -> str:
        return self.model.summary()

    def __repr__(self) -> str:
        return f"<{self.model.summary()}>"

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.view._repr_mimebundle_(include=include, exclude=exclude)
