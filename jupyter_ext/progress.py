"""The counting half of the progress display (the views in ``display.py`` only render it).

``MapProgress`` is fed from three sides: item futures finishing (results thread; with the
engine's ``started_at``/``finished_at``/``worker``/``slot`` when the futures carry them, for the
slowest items and the timeline), the job's server-side counters, the items seen running and the
workers' heartbeats (the updater thread; each GPU's utilisation and memory go into a bounded
history for the sparklines). ``snapshot()`` gives a view a consistent copy.
"""

from __future__ import annotations

import bisect
import threading
import time
import traceback

from .gpus import GpuHistory
from .tracebacks import as_text

__all__ = ["MapProgress", "ErrorGroup", "ItemTiming", "format_exception"]

STRAGGLERS = 5  # how many of the longest-running (or, at the end, slowest) items are shown
STRAGGLER_SECONDS = 1.0  # a running item is a straggler once it has run this long


def format_exception(exc: BaseException) -> str:
    """The exception as the notebook shows it (the user's cell lines) in a kernel; elsewhere
    the exception line plus the worker's traceback chained to it (when there is one)."""
    text = as_text(exc)
    if text:
        return text
    cause = exc.__cause__
    if cause is not None and type(cause).__name__ == "RemoteTraceback":
        return str(cause).strip().strip('"').strip()  # it ends with the exception line
    return "".join(traceback.format_exception_only(type(exc), exc)).rstrip()


class ErrorGroup:
    """Failures of one exception type: how many, on which hosts, which items, one traceback."""

    __slots__ = ("type", "count", "hosts", "items", "first", "traceback")

    def __init__(self, type_name: str):
        self.type, self.count, self.hosts, self.items = type_name, 0, [], []
        self.first, self.traceback = None, ""

    def add(self, index: int, exc: BaseException, host: str | None) -> None:
        self.count += 1
        if host and host not in self.hosts:
            self.hosts.append(host)
        bisect.insort(self.items, index)  # shown in item order, the first 20
        del self.items[20:]
        if self.first is None or index < self.first:
            self.first, self.traceback = index, format_exception(exc)


class ItemTiming(tuple):
    """When and where one item ran, as the engine reported it (epoch seconds)."""

    __slots__ = ()

    def __new__(cls, index, started, finished, worker, slot, failed):
        return super().__new__(cls, (index, started, finished, worker, slot, failed))

    index = property(lambda t: t[0])
    started = property(lambda t: t[1])
    finished = property(lambda t: t[2])
    worker = property(lambda t: t[3])
    slot = property(lambda t: t[4])
    failed = property(lambda t: t[5])
    seconds = property(lambda t: t[2] - t[1])


class MapProgress:
    """Counters of one map: done / failed / cancelled from the items themselves (exact),
    running / queued from the server (live), rate and ETA from the done items. ``cached``:
    the done items whose result came from the item cache (they count as done too)."""

    def __init__(self, total: int, name: str, job: str | None = None):
        self.total, self.name, self.job = total, name, job  # job: its id, to spot its GPUs
        self.done = self.failed = self.cancelled = self.cached = 0
        self.running, self.queued = 0, total
        self.started = time.monotonic()
        self.finished: float | None = None
        self.state = "running"  # running, done, failed, cancelled
        self.errors: dict[str, ErrorGroup] = {}
        self.workers: list[dict] = []
        self.by_worker: dict[str, int] = {}  # worker id -> items of this map it finished
        self.gpu_history = GpuHistory()
        self.running_since: dict[int, float] = {}  # item -> when the client saw it start
        self.timings: list[ItemTiming] = []  # finished items the engine timed
        self.version = 0
        self._lock = threading.Lock()

    # -- feeding -------------------------------------------------------------------------
    def item_finished(self, index: int, exc: BaseException | None = None,
                      cancelled: bool = False, host: str | None = None,
                      worker: str | None = None, started_at: float | None = None,
                      finished_at: float | None = None, slot=None,
                      cached: bool = False) -> bool:
        """Count one item; True when it was the last one. ``started_at``/``finished_at``
        (epoch seconds, from the engine) time it for the slowest items and the timeline;
        ``cached``: it did not run, its result came from the item cache (done)."""
        with self._lock:
            self.running_since.pop(index, None)
            if started_at is not None and finished_at is not None and not cancelled:
                self.timings.append(ItemTiming(index, started_at, finished_at, worker, slot,
                                               exc is not None))
            if worker and not cancelled:
                self.by_worker[worker] = self.by_worker.get(worker, 0) + 1
            if cancelled:
                self.cancelled += 1
            elif exc is not None:
                self.failed += 1
                name = type(exc).__name__
                self.errors.setdefault(name, ErrorGroup(name)).add(index, exc, host)
            else:
                self.done += 1
                self.cached += bool(cached)
            self.version += 1
            return self.done + self.failed + self.cancelled >= self.total

    def items_unfed(self, n: int) -> bool:
        """``n`` items were never submitted (a lazily fed map stopped): they count as
        cancelled; True when that ends the map."""
        with self._lock:
            self.cancelled += n
            self.version += 1
            return self.done + self.failed + self.cancelled >= self.total

    def server_counts(self, counts: dict) -> None:
        with self._lock:
            if self.finished is None:
                self.running = counts.get("running", 0)
                self.queued = counts.get("queued", 0)
                self.version += 1

    def saw_running(self, indices, now: float | None = None) -> None:
        """These items run now (as far as the client can tell: their futures are RUNNING)."""
        now = time.time() if now is None else now
        with self._lock:
            if self.finished is None:
                for i in indices:
                    self.running_since.setdefault(i, now)

    def set_workers(self, workers: list[dict]) -> None:
        with self._lock:
            self.workers = sorted(workers, key=lambda w: (w.get("host", ""), w.get("name", "")))
            self.gpu_history.update(self.workers)
            self.version += 1

    def finish(self, cancelled: bool = False, detached: bool = False) -> None:
        """The map has ended (``detached``: its view stopped following a job that runs on)."""
        with self._lock:
            if self.finished is not None:
                return
            self.finished = time.monotonic()
            self.running = self.queued = 0
            self.running_since.clear()
            if detached:
                self.state = "detached"
            elif cancelled or self.cancelled:
                self.state = "cancelled"
            else:
                self.state = "failed" if self.failed else "done"
            self.version += 1

    # -- reading -------------------------------------------------------------------------
    @property
    def elapsed(self) -> float:
        return (self.finished or time.monotonic()) - self.started

    @property
    def rate(self) -> float:
        """Finished items per second so far."""
        t = self.elapsed
        return (self.done + self.failed) / t if t > 0 else 0.0

    @property
    def eta(self) -> float | None:
        left = self.total - self.done - self.failed - self.cancelled
        if self.finished is not None or left <= 0:
            return 0.0
        return left / self.rate if self.rate > 0 else None

    @property
    def fraction(self) -> float:
        if not self.total:
            return 1.0
        return (self.done + self.failed + self.cancelled) / self.total

    def snapshot(self) -> dict:
        with self._lock:
            return {
                "name": self.name, "job": self.job, "total": self.total, "done": self.done,
                "failed": self.failed, "cancelled": self.cancelled, "cached": self.cached,
                "running": self.running,
                "queued": self.queued, "state": self.state, "elapsed": self.elapsed,
                "rate": self.rate, "eta": self.eta, "fraction": self.fraction,
                "errors": list(self.errors.values()), "workers": list(self.workers),
                "by_worker": dict(self.by_worker), "gpu_history": self.gpu_history.snapshot(),
                "stragglers": self._stragglers(), "timings": list(self.timings),
            }

    def _stragglers(self) -> list[tuple]:
        """``(item, seconds, still running)``: while running the items running longest, at the
        end the slowest the engine timed (none when its futures carry no timings)."""
        if self.finished is None:
            now = time.time()
            oldest = sorted(self.running_since.items(), key=lambda kv: kv[1])[:STRAGGLERS]
            return [(i, now - t, True) for i, t in oldest if now - t >= STRAGGLER_SECONDS]
        if not self.timings:
            return []
        # stragglers only: items that took clearly longer than a typical one (none when all
        # took about the same, or all were fast)
        durations = sorted(t.seconds for t in self.timings)
        bar = max(0.1, 1.5 * durations[len(durations) // 2])
        slowest = sorted(self.timings, key=lambda t: -t.seconds)[:STRAGGLERS]
        return [(t.index, t.seconds, False) for t in slowest if t.seconds >= bar]

    def summary(self) -> str:
        """One line: what a terminal, nbval or a frontend without widgets shows."""
        s = self.snapshot()
        head = {"running": "running", "done": "done", "failed": "finished with errors",
                "cancelled": "cancelled", "detached": "detached (its job runs on)"}[s["state"]]
        parts = [f"{s['done']}/{s['total']} done"]
        if s["cached"]:
            parts.append(f"{s['cached']} cached")
        if s["failed"]:
            parts.append(f"{s['failed']} failed")
        if s["cancelled"]:
            parts.append(f"{s['cancelled']} cancelled")
        if s["state"] == "running":
            parts.append(f"{s['running']} running, {s['queued']} queued")
            if s["eta"] is not None and s["done"]:
                parts.append(f"ETA {format_seconds(s['eta'])}")
        else:
            parts.append(f"in {format_seconds(s['elapsed'])} ({s['rate']:.1f} items/s)")
        job = f" [job {s['job']}]" if s["job"] else ""  # (to attach, cancel, read its logs)
        return f"miniray map {s['name']!r} {head}: " + ", ".join(parts) + job


def format_seconds(t: float) -> str:
    if t < 60:
        return f"{t:.1f}s"
    m, s = divmod(int(t), 60)
    return f"{m}m{s:02d}s" if m < 60 else f"{m // 60}h{m % 60:02d}m"
