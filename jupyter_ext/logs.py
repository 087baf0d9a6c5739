"""A bounded, rate-limited buffer of the workers' log lines for one map (no rendering here)."""

from __future__ import annotations

import collections
import threading
import time

__all__ = ["LogBuffer", "format_line"]


def format_line(line) -> str:
    """``[worker #item] text``, with ``!`` after the item for stderr lines."""
    item = "" if line.task is None else f" #{line.task}"
    mark = "!" if line.stream == "stderr" else ""
    return f"[{line.worker}{item}]{mark} {line.text}"


class LogBuffer:
    """Keeps the last ``capacity`` lines; past ``max_per_second`` lines in a second the rest
    of that second is counted as dropped, so a chatty task cannot flood the notebook."""

    def __init__(self, capacity: int = 1000, max_per_second: int = 200):
        self._lines: collections.deque = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self.max_per_second = max_per_second
        self._window, self._in_window = 0, 0
        self.dropped = 0
        self.total = 0
        self.version = 0  # bumps on every change, so a view re-renders only when needed
        self.workers: list[str] = []

    def add(self, line) -> None:
        now = int(time.monotonic())
        with self._lock:
            self.total += 1
            if now != self._window:
                self._window, self._in_window = now, 0
            self._in_window += 1
            if self._in_window > self.max_per_second:
                self.dropped += 1
                return
            self._lines.append((self.total - 1, line))
            if line.worker not in self.workers:
                self.workers.append(line.worker)
            self.version += 1

    def lines(self, worker: str | None = None, last: int = 200) -> list:
        with self._lock:
            lines = [ln for _, ln in self._lines]
        if worker:
            lines = [ln for ln in lines if ln.worker == worker]
        return lines[-last:]

    def tail(self, last: int = 200) -> tuple[list, int]:
        """The last ``last`` lines as ``(sequence number, line)`` (numbers grow by one per line
        received, so a view tells new lines from old) and how many earlier lines they leave out
        (rotated out of the buffer, dropped by the rate limit, or just older)."""
        with self._lock:
            entries = list(self._lines)[-last:] if last > 0 else []
            return entries, self.total - len(entries)

    def text(self, worker: str | None = None, last: int = 200) -> str:
        out = [format_line(ln) for ln in self.lines(worker, last)]
        if self.dropped:
            out.append(f"... {self.dropped} line(s) dropped (over {self.max_per_second}/s)")
        return "\n".join(out)
