"""Progress in a script or a terminal: ``miniray.progress`` (and ``Executor.map(...,
progress=True)``) draws a tqdm bar that moves as items end, in any order, while the results
are yielded in order, and ends with a summary of the errors by type x count x host, as
comma's ``miniray.log`` does.

tqdm draws the bar (rate, ETA); a daemon thread of ours moves it every ``TICK`` seconds from
counts that the futures' callbacks keep, so the caller can block on the next item in order.
Outside a terminal (a CI log, ``| cat``) a redrawn bar would be one endless line of carriage
returns: there the bar is printed as a plain line when it starts, at most every
``LINE_SECONDS``, and at the end.
"""

from __future__ import annotations

import concurrent.futures as cf
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Collection

from miniray.errors import ConfigurationError, JobCancelledError

__all__ = ["progress", "ERRORS", "format_errors"]

ERRORS = ("raise", "skip", "return")  # what progress() does with a failed item
TICK = 0.1  # seconds between two looks at the counts (the bar is redrawn only on a change)
LINE_SECONDS = 10.0  # outside a terminal: at most one line this often
_MAX_ROWS = 8  # rows of the error summary; the rest are counted in one line
_WHERE = re.compile(r"\[miniray\] raised by .* on (\S+) \(worker ")  # delivery._decorate's note


def progress(items, desc: str | None = None, total: int | None = None, *,
             errors: str = "raise", timeout: float | None = None, file=None, **tqdm_kwargs):
    """Yield the results of ``items`` in order while a tqdm bar shows how many items ended
    (done and failed counts, rate, ETA); at the end, or on an error, Ctrl-C or a ``break``,
    print a summary of the failed items by exception type, count and host.

    ``items``: futures (a list moves the bar as each one ends, in any order; an iterator of
    futures, e.g. ``map_futures(..., buffersize=N)``, as they are reached), or the values of
    an iterator such as ``Executor.map``'s (the bar moves as they are yielded).

    ``errors`` says what a failed (or cancelled) item does when the loop reaches it:

    - ``"raise"`` (the default, as ``concurrent.futures``): its exception is raised there,
      after the summary; the futures not reached yet run on;
    - ``"skip"``: it is left out (comma's way: keep going, read the summary at the end);
    - ``"return"``: its exception object is yielded in its place (positions stay aligned).

    An iterator of plain values (``Executor.map``'s) ends at its first error whatever
    ``errors`` says: give futures (``ex.map_futures(...)``) to go on past failures.

    ``total``: the number of items (default ``len(items)`` when it has one); ``desc``: the
    bar's label; ``timeout``: seconds for the whole loop, then ``TimeoutError`` (as
    ``Executor.map``); ``file``: where the bar and summary go (default ``sys.stderr``); other
    keywords go to ``tqdm`` (``leave=False``, ``ncols=60``...).

    >>> futures = [ex.submit(resize, p) for p in paths]             # doctest: +SKIP
    >>> images = list(miniray.progress(futures, desc="resize", errors="skip"))  # doctest: +SKIP
    resize: 100%|██████████| 100/100 [00:04<00:00, 23.1item/s, done=97, failed=3]
    3 of 100 items failed:
      ValueError        x2  on gpu1  first: item 17: bad header
      TaskTimeoutError  x1  on gpu2  first: item 40: task 40 ran over 60 s
    """
    if errors not in ERRORS:
        raise ConfigurationError(f"progress(errors={errors!r}): say what a failed item does: "
                                 "'raise' (its exception, when the loop reaches it), 'skip' "
                                 "(leave it out) or 'return' (yield the exception object)")
    if timeout is not None and not (isinstance(timeout, (int, float)) and timeout >= 0):
        raise ConfigurationError(f"progress(timeout={timeout!r}): give seconds >= 0, or None "
                                 "to wait as long as the items take")
    if isinstance(items, Collection) and not isinstance(items, (list, tuple)):
        items = list(items)  # (a set of futures, say: wait()'s answer)
    if total is None:
        try:
            total = len(items)
        except TypeError:
            total = None
    tally = _Tally()
    if isinstance(items, (list, tuple)):  # every future is known: count each as it ends
        for i, f in enumerate(items):
            if isinstance(f, cf.Future):
                f.add_done_callback(lambda f, i=i: tally.future_ended(f, i))
        source, watched = items, True
    else:
        source, watched = items, False
    return _Run(tally, desc, total, file, tqdm_kwargs, errors).iterate(
        _items(source, tally, watched, errors, timeout))


def bar_map(ex, fn, iterables: tuple, label, timeout, chunksize: int, buffersize, cache):
    """``Executor.map(..., progress=label)``: the map's own iterator (its order, errors,
    timeout, lazy feeding and Ctrl-C), with a bar moved by its chunks as they end."""
    desc = label if isinstance(label, str) else getattr(fn, "__name__", None)
    if desc == "<lambda>":
        desc = None
    total = None
    if iterables and all(hasattr(it, "__len__") for it in iterables):
        total = min(len(it) for it in iterables)
    tally = _Tally()
    if cache:  # (the cached map merges cached values into a plain map: count them as read)
        values = ex._map(fn, iterables, timeout, chunksize, buffersize, cache)
        return _Run(tally, desc, total, None, {}).iterate(_items(values, tally, True, "raise",
                                                                 None))
    first = ex._next_task
    values = ex._map(fn, iterables, timeout, chunksize, buffersize, cache,
                     on_chunk=lambda f, n: f.add_done_callback(
                         lambda f: tally.chunk_ended(f, f.task_id - first, n)))
    return _Run(tally, desc, total, None, {}).iterate(_values(values))


def format_errors(errors: list, total: int | None = None) -> str:
    """The summary of failed items, one row per exception type and host, most frequent
    first; ``errors`` holds ``(type name, host, item, message)`` per failed item::

        3 of 100 items failed:
          ValueError        x2  on gpu1  first: item 17: bad header
          TaskTimeoutError  x1  on gpu2  first: item 40: task 40 ran over 60 s
    """
    if not errors:
        return ""
    counts = Counter((kind, host) for kind, host, _, _ in errors)
    first: dict = {}
    for kind, host, item, message in sorted(errors, key=lambda e: (e[2] is None, e[2] or 0)):
        first.setdefault((kind, host), (item, message))
    rows = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    width = max(len(kind) for (kind, _), _ in rows[:_MAX_ROWS])
    hostw = max(len(host) for (_, host), _ in rows[:_MAX_ROWS])
    of = f" of {total}" if total is not None else ""
    out = [f"{len(errors)}{of} item{'s' if len(errors) != 1 or total else ''} failed:"]
    for (kind, host), n in rows[:_MAX_ROWS]:
        item, message = first[(kind, host)]
        at = f"item {item}: " if item is not None else ""
        out.append(f"  {kind.ljust(width)}  x{str(n).ljust(len(str(rows[0][1])))}  "
                   f"on {host.ljust(hostw)}  first: {at}{_short(message)}")
    if len(rows) > _MAX_ROWS:
        rest = sum(n for _, n in rows[_MAX_ROWS:])
        out.append(f"  ... and {rest} more in {len(rows) - _MAX_ROWS} other type/host group(s)")
    return "\n".join(out)


def _short(message: str, width: int = 70) -> str:
    line = (message.strip().splitlines() or [""])[0]
    return line if len(line) <= width else line[:width - 1] + "…"


def _host(exc: BaseException, default=None) -> str:
    """Where a task's exception was raised: the note the executor adds to it names the host."""
    for note in getattr(exc, "__notes__", None) or ():
        m = _WHERE.search(str(note))
        if m:
            return m.group(1)
    return default or "?"


class _Tally:
    """Counts of ended items, kept by futures' callbacks (any thread), read by the bar."""

    def __init__(self):
        self._lock = threading.Lock()
        self.done = self.failed = self.cancelled = 0
        self.errors: list = []  # (type name, host, item, message) per failed item
        self._seen: set = set()  # items counted (a value's yield and its callback: once)

    def counts(self) -> tuple:
        with self._lock:
            return self.done, self.failed, self.cancelled

    def ok(self, n: int = 1) -> None:
        with self._lock:
            self.done += n

    def cancel(self, n: int = 1) -> None:
        with self._lock:
            self.cancelled += n

    def fail(self, exc: BaseException, host, item) -> None:
        if isinstance(exc, (cf.CancelledError, JobCancelledError)):
            return self.cancel()
        with self._lock:
            self.failed += 1
            self.errors.append((type(exc).__name__, _host(exc, host), item, str(exc)))

    def future_ended(self, f: cf.Future, item) -> None:
        """A done callback: it must never raise (concurrent.futures would only log it)."""
        try:
            with self._lock:
                if item in self._seen:
                    return
                self._seen.add(item)
            if f.cancelled():
                self.cancel()
            elif f.exception() is None:
                self.ok()
            else:
                self.fail(f.exception(), getattr(f, "host", None), item)
        except Exception:
            pass

    def chunk_ended(self, f: cf.Future, start: int, n: int) -> None:
        """A map chunk's done callback: its ``n`` items, from item ``start``, ended."""
        try:
            if f.cancelled():
                return self.cancel(n)
            exc = f.exception()
            if exc is not None:  # (the executor broke: every item of the chunk failed)
                for i in range(n):
                    self.fail(exc, getattr(f, "host", None), start + i)
                return
            _, errs = f.result()
            for i, e in sorted((errs or {}).items()):
                self.fail(e, getattr(f, "host", None), start + i)
            self.ok(n - len(errs or {}))
        except Exception:
            pass


def _items(source, tally: _Tally, watched: bool, errors: str, timeout):
    """Each item's outcome in order, as ``(ok, value_or_exception)``: futures are waited
    for (all together within ``timeout`` when given), plain values passed on; an iterator of
    values that raises ends there (its error is counted and raised)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    it = iter(source)
    i = 0
    while True:
        try:
            f = next(it)
        except StopIteration:
            return
        except Exception as e:  # (Executor.map's iterator raising its first failed item)
            tally.fail(e, None, i)
            if errors != "raise" and hasattr(e, "add_note"):
                e.add_note(f"[miniray] progress(errors={errors!r}) cannot go on past this "
                           "error: an iterator of values (Executor.map's) ends at its first "
                           "error; give progress() futures (ex.map_futures(...)) to keep going")
            raise
        if not isinstance(f, cf.Future):
            tally.ok()
            yield True, f
            i += 1
            continue
        if not watched:
            f.add_done_callback(lambda f, i=i: tally.future_ended(f, i))
        left = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            exc = f.exception(timeout=left)
        except cf.CancelledError as e:
            exc = e
        # (a cf.TimeoutError here is the loop's timeout: it propagates, as Executor.map's)
        if exc is None:
            yield True, f.result()
        else:
            tally.future_ended(f, i)  # (counted now, if its callback has not run yet)
            yield False, exc
        i += 1


def _values(values):
    """A map's own iterator (its chunks' callbacks count the items), closed at the end: a
    map's iterator cancels what it has not yielded when it is closed."""
    try:
        for v in values:
            yield True, v
    finally:
        values.close()


def _is_tty(file) -> bool:
    try:
        return bool(file.isatty())
    except Exception:
        return False


class _Lines:
    """A file for tqdm outside a terminal: each redraw becomes one plain line."""

    def __init__(self, file):
        self._file = file

    def write(self, s: str) -> None:
        text = s.replace("\r", "").rstrip()
        if text:
            self._file.write(text + "\n")

    def flush(self) -> None:
        try:
            self._file.flush()
        except Exception:
            pass


class _Run:
    """One bar: the tqdm object, the thread that moves it, the summary at the end."""

    def __init__(self, tally: _Tally, desc, total, file, tqdm_kwargs: dict,
                 errors: str = "raise"):
        self.tally, self.desc, self.total, self.errors = tally, desc, total, errors
        self.file = sys.stderr if file is None else file
        self.kwargs = tqdm_kwargs
        self.started = time.time()  # (the work started now: its rate counts from here)

    def _bar(self):
        from tqdm import tqdm

        tty = _is_tty(self.file)
        kw = dict(desc=self.desc, total=self.total, unit="item", disable=False,
                  file=self.file if tty else _Lines(self.file), dynamic_ncols=tty)
        if not tty:  # a line now and then, in plain characters, of a fixed width
            kw.update(mininterval=LINE_SECONDS, maxinterval=LINE_SECONDS, ascii=True, ncols=100)
        kw.update(self.kwargs)
        bar = tqdm(**kw)
        bar.start_t = min(bar.start_t, self.started)  # (tqdm's clock is time.time too)
        return bar

    def _sync(self, bar) -> None:
        done, failed, cancelled = self.tally.counts()
        n = done + failed  # (cancelled items did not run: the bar does not fill for them)
        post = f"done={done}, failed={failed}" + (f", cancelled={cancelled}" if cancelled else "")
        if n != bar.n or post != bar.postfix:
            bar.set_postfix_str(post, refresh=False)
            bar.update(n - bar.n)

    def iterate(self, outcomes):
        """Yield the values of ``outcomes`` (``(ok, value)`` pairs) as ``errors`` asks, the
        bar moving meanwhile; close the bar and print the summary however the loop ends."""
        bar = self._bar()
        stop = threading.Event()

        def follow():
            while not stop.wait(TICK):
                try:
                    self._sync(bar)
                except Exception:  # (a closed file: the bar just stops moving)
                    return

        mover = threading.Thread(target=follow, daemon=True, name="miniray-progress")
        mover.start()
        why = None
        try:
            for ok, value in outcomes:
                if ok:
                    yield value
                elif self.errors == "raise":
                    why = "raised"
                    raise value
                elif self.errors == "return":
                    yield value  # ("skip": nothing)
        except KeyboardInterrupt:
            why = "interrupted"
            raise
        except GeneratorExit:
            why = "left"
            raise
        except BaseException:
            why = why or "raised"
            raise
        finally:
            stop.set()
            mover.join(1.0)
            outcomes.close()  # (a map's own iterator, in bar_map: what was not yielded stops)
            self._finish(bar, why)

    def _finish(self, bar, why) -> None:
        try:
            self._sync(bar)
            if self.tally.failed and _is_tty(self.file):
                bar.colour = "red"
            bar.close()
            done, failed, cancelled = self.tally.counts()
            lines = []
            if why == "interrupted":
                of = f" of {self.total}" if self.total is not None else ""
                lines.append(f"interrupted (Ctrl-C) after {done + failed}{of} items ended "
                             f"({done} done, {failed} failed)")
            summary = format_errors(self.tally.errors, self.total)
            if summary:
                lines.append(summary)
            if lines:
                self.file.write("\n".join(lines) + "\n")
                self.file.flush()
        except Exception:  # (the file went away: nothing more to tell)
            pass
