"""What ``miniray logs`` prints: a job's captured lines, each with its time, worker and item,
under a line that says which job it is and where it stands; ``-f`` follows them until the job
ends (or Ctrl-C). Also a job's state in words with its counts (``failed 3 of 10``), which
``miniray jobs`` shows too."""

from __future__ import annotations

import time
from typing import Callable, Iterator

from miniray.keys import Keys

from . import observe

__all__ = ["describe", "format_line", "header", "follow_lines"]

_ENDED_CHECK_SECONDS = 1.0  # while following: how often to ask whether the job has ended


def describe(p: dict) -> str:
    """A job's state in words, with counts where they say more: ``queued``, ``running``,
    ``done``, ``cancelled``, ``failed 3 of 10`` (``given up`` when the cluster gave up a job
    whose client went silent)."""
    status = p.get("status") or observe.job_status(p)
    if p.get("state") == "orphaned":
        return "failed (given up)"
    if status == "failed":
        total = sum(int(p.get(c) or 0) for c in observe._COUNTERS)
        return f"failed {p.get('failed', 0)} of {total}"
    return status


def _clock(t: float, now: float) -> str:
    lt = time.localtime(t)
    ms = f".{int(t * 1000) % 1000:03d}"
    if lt[:3] == time.localtime(now)[:3]:
        return time.strftime("%H:%M:%S", lt) + ms
    return time.strftime("%Y-%m-%d %H:%M:%S", lt) + ms


def format_line(line: observe.LogLine, now: float | None = None) -> str:
    """One captured line for a terminal: time (local, ms; the date too if not today), worker,
    the item in brackets, the stream, the text::

        14:52:01.123 local-0[17] stdout: loading shard 17
    """
    now = time.time() if now is None else now
    item = "" if line.task is None else f"[{line.task}]"
    return f"{_clock(line.time, now)} {line.worker}{item} {line.stream}: {line.text}"


def header(p: dict, item: int | None = None, now: float | None = None) -> str:
    """The line above a job's logs: its id, name, state in words, start and duration."""
    now = time.time() if now is None else now
    created, finished = p.get("created"), p.get("finished")
    ran = "" if not created else (
        f", started {observe._local_time(created, now)}, "
        + (f"ran {observe.format_duration(finished - created)}" if finished
           else f"open for {observe.format_duration(now - created)}"))
    which = "" if item is None else f"; only item {item}"
    return (f"job {p['job']} {p['name']!r}: {describe(p)}{ran}{which}\n"
            "(each line: time worker[item] stream: text)")


def follow_lines(r, keys: Keys, job: str, follow: bool, item: int | None = None,
                 ) -> Iterator[observe.LogLine]:
    """The job's lines (only ``item``'s when given); with ``follow``, new ones as they come
    until the job has ended (its counters final) and its last lines are read."""
    stop: Callable[[], bool] | None = None
    if follow:
        last = [0.0]

        def stop() -> bool:  # (called between reads that found nothing new)
            if time.monotonic() - last[0] < _ENDED_CHECK_SECONDS:
                return False
            last[0] = time.monotonic()
            return observe.job_progress(r, keys, job)["state"] not in ("open", "closing")

    for line in observe.iter_logs(r, keys, job, follow=follow, stop=stop):
        if item is None or line.task == item:
            yield line
