"""One running ``%%miniray map``: its executor, item futures, progress model, logs and view.

A ``MapRun`` is also the handle ``--bg`` returns: ``result()``, ``results()``, ``progress()``,
``cancel()``, ``done()``, ``wait()``, ``logs()``, ``timings()``; it displays as the live
widget (``MapRun.attach(handle)``: the same for a kept job followed through a
``miniray.JobHandle``, ``%miniray attach``), and when the map ends ``leave_snapshot()`` replaces that display with the final state
as static HTML (what a saved notebook keeps).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Sequence
from concurrent.futures import CancelledError
from concurrent.futures import TimeoutError as FuturesTimeout
from concurrent.futures import wait as wait_futures
from typing import NamedTuple

import miniray

from .busy import cell_parent, say_busy
from .display import WidgetView, make_view
from .feed import start_feed
from .logs import LogBuffer
from .progress import MapProgress
from .tracebacks import item_error

__all__ = ["MapRun", "MISSING", "Timing"]

#: what ``results()`` puts in place of an item that failed or never ran (cancelled)
MISSING = None

_UPDATE_SECONDS = 0.1  # the view is refreshed at most ~10 times a second
_WORKERS_SECONDS = 1.0  # heartbeats come once a second; polling faster shows nothing new
_RUNNING_WINDOW = 512  # futures looked at per update to see which items started


def _display_parent():
    """The header of the request (cell) that displays now, to update that output later from
    another thread (ipykernel routes a thread's output to whatever cell is current)."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    pub = getattr(get_ipython(), "display_pub", None)
    return getattr(pub, "parent_header", None)



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
    """Run ``fn`` over ``items`` as one miniray job and watch it (``cache=True``: items
    whose result is in the cluster's item cache are not run, see ``miniray.cache``).

    >>> run = MapRun(lambda x: x * 2, range(10), job_name="double")   # doctest: +SKIP
    >>> run.result()                                                  # doctest: +SKIP
    [0, 2, 4, ...]
    """

    item_name: str | None = None  # the map's variable (``x``), which its errors name

    def __init__(self, fn, items, *, redis_url=None, job_name=None, priority=1, limits=None,
                 chunksize=1, view=None, cancel_button=False, start=True, cache=False,
                 keep=False, handle=None, buffersize=None):
        """``keep``: the job outlives this kernel (``Executor(keep=True)``; ``--bg`` uses
        it); ``handle``: follow that ``miniray.JobHandle`` instead of running anything (see
        ``attach``); ``buffersize``: at most that many chunks submitted and unfinished at
        once, the input read as they finish (see ``jupyter_ext.feed``; not with ``cache``
        or ``keep``, which submit everything at once). ``items`` that are a ``Sequence``
        (a range, a list) are not copied; other iterables are read into a list first."""
        if not isinstance(items, Sequence):
            items = list(items)
        self._buffersize = None if cache or keep else buffersize
        self._keep = keep
        self.attached = handle is not None
        if handle is not None:
            self.executor = handle
            items = handle.futures
        else:
            self.executor = miniray.Executor(redis_url=redis_url, job_name=job_name,
                                             priority=priority, limits=limits, keep=keep)
        self.job = self.executor.job_id
        self.name = self.executor.job_name
        self.model = MapProgress(len(items), self.name, job=self.job)
        self.log_buffer = LogBuffer()
        self.view = make_view(self.model, self.log_buffer,
                              on_cancel=self.cancel if cancel_button else None, kind=view)
        self._cell = None  # the cell waiting in wait(), kept "busy" in JupyterLab (busy.py)
        self._displays: list = []  # (DisplayHandle, parent header) of each live display
        self._snapshot_lock = threading.Lock()
        self._snapshot_left = False
        self._snapshot_shown = False  # a display was updated to the final state
        self._scan_from = 0  # futures before this one have all finished
        self._finished = threading.Event()
        self._cancel_requested = False
        self._fn, self._items, self._chunksize = fn, items, chunksize
        self._cache = cache  # items the cluster's item cache has are not run (miniray.cache)
        self.futures: list = []
        self._feed = None  # the thread taking a lazily fed map's futures (jupyter_ext.feed)
        self._started = False
        if start:
            self.start()

    @classmethod
    def attach(cls, handle, *, view=None, cancel_button=False, start=True) -> "MapRun":
        """The live view of a kept job followed through ``handle`` (a ``miniray.JobHandle``):
        nothing is submitted; its items are the job's items (the ones submitted so far if its
        owner has not sealed it yet). ``detach()`` stops following; ``cancel()`` cancels the
        job itself."""
        return cls(None, (), handle=handle, view=view, cancel_button=cancel_button,
                   start=start)

    def detach(self) -> None:
        """Stop following an attached job (it goes on running on the cluster)."""
        if self.attached and not self._finished.is_set():
            self.model.finish(detached=True)
            self._finished.set()
            self.executor.close()

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
            if self.attached:
                self.futures = items
            else:
                total = len(items)
                if self._buffersize and total > self._buffersize * self._chunksize:
                    stream = self.executor.map_futures(fn, items, chunksize=self._chunksize,
                                                       buffersize=self._buffersize)
                    self._feed = start_feed(self, stream, total)  # fills self.futures
                else:
                    self.futures = self.executor.map_futures(
                        fn, items, chunksize=self._chunksize, cache=self._cache)
                if self._keep:  # no more items: the cluster ends the job even without us
                    self.executor.seal()
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):  # interrupted while submitting: what was
                self._cancel_requested = True     # sent is cancelled, running items too
                self.executor.cancel()
            self.executor.shutdown(wait=False, cancel_futures=True)
            self._finish()
            self._render()
            self.view.finish()
            self.leave_snapshot()  # no updater will: the cell leaves it
            raise
        if self._feed is None:
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
        else:  # the engine's timings, where its futures carry them
            last = self.model.item_finished(
                index, fut.exception(), host=fut.host, worker=fut.worker,
                started_at=getattr(fut, "started_at", None),
                finished_at=getattr(fut, "finished_at", None), slot=getattr(fut, "slot", None),
                cached=getattr(fut, "cached", False))
        if last:
            self._finish()

    def _follow_logs(self) -> None:
        try:
            for line in self.executor.logs(follow=True):
                self.log_buffer.add(line)
        except Exception:  # the server went away (e.g. %miniray down): the log simply ends
            pass

    def discard(self) -> None:
        """End a run that was never started (interrupted while it was being displayed):
        nothing was submitted; its executor is closed and its view shows it cancelled."""
        if self._started:
            return
        self._started = True
        self._cancel_requested = True
        self._fn = self._items = None
        self.executor.shutdown(wait=False, cancel_futures=True)
        self._finish()
        self._render()
        self.view.finish()
        self.leave_snapshot()

    def _finish(self) -> None:
        self.model.finish(cancelled=self._cancel_requested)
        self._finished.set()

    def _scan_running(self) -> None:
        """Tell the model which items started (their futures turned RUNNING), looking at a
        bounded window from the first unfinished item on: workers take items in order."""
        futures = self.futures
        while self._scan_from < len(futures) and futures[self._scan_from].done():
            self._scan_from += 1
        window = range(self._scan_from, min(len(futures), self._scan_from + _RUNNING_WINDOW))
        self.model.saw_running([i for i in window if futures[i].running()])

    def _update_loop(self) -> None:
        next_workers = next_busy = 0.0
        ex = self.executor
        while not self._finished.is_set():
            try:
                cell = self._cell
                if cell is not None and time.monotonic() >= next_busy:
                    say_busy(cell)
                    next_busy = time.monotonic() + 1.0
                self._scan_running()
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
        # the lanes end idle: every item of this map has ended, so a slot a heartbeat still
        # shows on it (sent before its last item ended, or an interrupted task on its way
        # out) is idle for this map; the cell does not wait for the next heartbeat
        try:
            self.model.set_workers([_without_job(w, self.job) for w in ex.workers()])
        except Exception:
            pass
        self._render()
        self.view.finish()
        self.leave_snapshot()

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
        if threading.current_thread() is threading.main_thread():
            self._cell = cell_parent()  # a cell blocks here: the kernel is busy with it
        try:
            while not self._finished.is_set():
                step = 0.1 if deadline is None else min(0.1, deadline - time.monotonic())
                if step <= 0:
                    return False
                self._finished.wait(step)
            return True
        finally:
            self._cell = None

    def settle(self, timeout: float = 5.0) -> None:
        """Wait until the view has rendered its final state (logs included)."""
        updater = getattr(self, "_updater", None)  # (none when submitting failed)
        if updater is not None:
            updater.join(timeout)

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
        items (and for those a lazily fed map has not submitted)."""
        out = []
        for f in list(self.futures):
            if f.done() and not f.cancelled() and f.exception() is None:
                out.append(f.result())
            else:
                out.append(missing)
        return out + [missing] * (self.model.total - len(out))

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
        errors = self.errors
        if errors:  # shown with the user's frames, naming the item
            raise item_error(self, min(errors), self.item_name)
        if self.cancelled:
            raise CancelledError(f"map {self.name!r} was cancelled; .results() has what finished")
        return self.results()

    def progress(self) -> dict:
        """Counts and state: total, done (cached: how many of them came from the item
        cache), failed, cancelled, running, queued, rate, eta."""
        s = self.model.snapshot()
        return {k: s[k] for k in ("state", "total", "done", "cached", "failed", "cancelled",
                                  "running", "queued", "rate", "eta", "elapsed")}

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

    def _ipython_display_(self) -> None:
        """IPython shows the run (``display(run)`` or a cell's value) through here: the live
        widget under a display id, so ``leave_snapshot()`` can replace it; a run that has
        left its snapshot shows that."""
        from IPython.display import display

        if not isinstance(self.view, WidgetView):
            display(self.view._repr_mimebundle_(), raw=True)
            return
        with self._snapshot_lock:
            if self._snapshot_left:
                display(self._snapshot(), raw=True)
                return
            handle = display(self._repr_mimebundle_(), raw=True, display_id=True)
            self._displays.append((handle, _display_parent()))

    def _snapshot(self) -> dict:
        from .snapshot import snapshot_bundle

        return snapshot_bundle(self.model, self.log_buffer)

    @property
    def snapshot_left(self) -> bool:
        """True once a display of this run shows its final state (see ``leave_snapshot``)."""
        return self._snapshot_shown

    def leave_snapshot(self) -> None:
        """Replace the live widget's displays with the final state as static HTML and text
        (a saved notebook keeps that; the widget needs the running kernel). Once, when the map
        has ended: the updater thread does it last, as the output of the cell that displayed
        the run (a blocking cell waits for that in ``settle()``)."""
        with self._snapshot_lock:
            if self._snapshot_left or not self._finished.is_set():
                return
            self._snapshot_left = True
            displays, self._displays = self._displays, []
        if not displays:
            return
        bundle = self._snapshot()
        from IPython import get_ipython

        pub = getattr(get_ipython(), "display_pub", None)
        for handle, parent in displays:
            token = None
            if parent and hasattr(pub, "set_thread_parent"):
                token = pub.set_thread_parent(parent)  # the output of the cell that displayed
            try:
                handle.update(bundle, raw=True)
                self._snapshot_shown = True
            except Exception:  # the kernel's channels are closing: the live widget stays
                pass
            finally:
                if token is not None:
                    pub.reset_thread_parent(token)
