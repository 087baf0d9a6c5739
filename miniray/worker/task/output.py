"""What a task prints becomes log lines: stdout, stderr and ``logging`` in the task process.

A write is a list append and a scan of what it writes, whatever came before: the list is cut
into lines when a write holds ``\\n`` (so a line reaches the log stream while its task still
runs) and otherwise every ``_TAKE_EVERY`` writes (so the list stays small). Nothing written is
scanned or copied twice: a progress bar's 40,000 ``\\r`` updates cost time in proportion to
their bytes (``bench/task_output.py``: about 150 ns a write, a Python method call's worth).

A line is what a terminal would show of it: of its ``\\r``-separated segments, the last one
that is not empty. A line still open (a progress bar mid-way, a ``print(end="")``) is streamed
as it stands when the task flushes or writes a lot, at most every ``PROGRESS_SECONDS``, and
ends at ``\\n`` or when its chunk returns. Each line is cut to ``MINIRAY_LOG_LINE_MAX_BYTES``
of UTF-8 with a marker saying how many bytes were cut, so the job's log stream is bounded in
bytes as well as in lines (``MINIRAY_LOG_STREAM_MAXLEN``).
"""

from __future__ import annotations

import io
import logging
import threading
import time

__all__ = ["Capture", "LogHandler", "cap_line", "end_lines"]

_TAKE_EVERY = 512  # writes without a newline kept before they are cut (memory, not speed)
PROGRESS_SECONDS = 1.0  # an open line (a progress bar) is streamed at most this often


def cap_line(text: str, max_bytes: int, cut: int = 0) -> str:
    """``text`` cut to ``max_bytes`` of UTF-8, with a marker if anything (``cut`` bytes
    before, or now) was cut."""
    if not cut and len(text) * 4 <= max_bytes:  # (a character is at most 4 bytes)
        return text
    data = text.encode("utf-8", "replace")
    if len(data) > max_bytes:
        kept = data[:max_bytes].decode("utf-8", "ignore")  # (not half a character)
        cut += len(data) - len(kept.encode("utf-8"))
        text = kept
    if not cut:
        return text
    return f"{text} ... [miniray: {cut} more bytes cut from this line]"


def _nbytes(s: str) -> int:
    return len(s) if s.isascii() else len(s.encode("utf-8", "replace"))


class Capture(io.TextIOBase):
    """A text stream (``sys.stdout`` of a task process) that hands its lines to ``emit``.

    ``emit(name, lines)`` is called under this stream's lock, so lines keep their order when
    several threads print."""

    def __init__(self, emit, name: str, max_bytes: int = 65536):
        self._emit, self.name = emit, name
        self._max = max(int(max_bytes), 100)
        self._parts: list = []  # writes not cut yet: appended to, or a prefix deleted
        self._lock = threading.Lock()
        # the open line: the segment being written (after its last \r) with the bytes cut
        # from it, the last finished non-empty segment before it, and what was streamed of it
        self._seg, self._seg_cut = "", 0
        self._prev: tuple | None = None
        self._shown: str | None = None
        self._checked = float("-inf")

    def writable(self):
        return True

    def write(self, s):
        if type(s) is not str:
            if not isinstance(s, str):
                raise TypeError(f"write() argument must be str, not {type(s).__name__}")
            s = str(s)
        parts = self._parts
        parts.append(s)
        if "\n" in s:
            self._take()
        elif len(parts) >= _TAKE_EVERY:
            self._take(progress=True)
        return len(s)

    def flush(self):
        if time.monotonic() - self._checked >= PROGRESS_SECONDS:
            self._take(progress=True)

    def finish(self):
        """End the open line (its chunk returned): ship everything written."""
        if self._parts or self._seg or self._seg_cut or self._prev is not None:
            self._take(end=True)

    @property
    def encoding(self):
        return "utf-8"

    def isatty(self):
        return False

    # -- cutting --------------------------------------------------------------------------
    def _take(self, progress: bool = False, end: bool = False) -> None:
        with self._lock:
            parts = self._parts
            n = len(parts)
            data = parts[0] if n == 1 else "".join(parts[:n])
            del parts[:n]  # (other threads may have appended since: those stay)
            out: list = []
            if "\r" in data or self._prev is not None or self._seg_cut:
                lines = data.split("\n")
                for piece in lines[:-1]:
                    self._feed(piece)
                    self._end(out, True)
                self._feed(lines[-1])
            elif "\n" in data:  # plain lines: no segment to pick, most likely no cut
                lines = data.split("\n")
                rest = lines.pop()
                if self._seg:
                    lines[0], self._seg = self._seg + lines[0], ""
                big = self._max // 4
                out = [t if len(t) <= big else cap_line(t, self._max) for t in lines]
                if self._shown is not None and out[0] == self._shown:
                    del out[0]  # streamed already, as it stood
                self._shown = None
                self._add(rest)
            else:
                self._add(data)
            if end:
                self._end(out, False)
            elif progress and time.monotonic() - self._checked >= PROGRESS_SECONDS:
                self._checked = time.monotonic()
                view = self._view()
                if view is not None and view != self._shown:
                    out.append(view)
                    self._shown = view
            if out:
                self._emit(self.name, out)

    def _feed(self, piece: str) -> None:
        """Add text without a newline to the open line."""
        i = piece.rfind("\r")
        if i < 0:
            self._add(piece)
            return
        head = piece[:i].rstrip("\r")  # (empty segments do not count)
        j = head.rfind("\r")
        if j >= 0:  # a whole new segment ends before the last \r: it is the one shown
            last = head[j + 1:]
            cut = _nbytes(last[self._max:]) if len(last) > self._max else 0
            self._prev = (last[: self._max], cut)
        else:
            self._add(head)
            if self._seg or self._seg_cut:
                self._prev = (self._seg, self._seg_cut)
        self._seg, self._seg_cut = "", 0
        self._add(piece[i + 1:])

    def _add(self, s: str) -> None:
        if not s:
            return
        seg = self._seg
        if self._seg_cut or len(seg) + len(s) > self._max:
            room = self._max - len(seg)
            if room > 0:
                self._seg, s = seg + s[:room], s[room:]
            self._seg_cut += _nbytes(s)
        else:
            self._seg = seg + s

    def _view(self) -> str | None:
        """The open line as a terminal shows it, capped; None when there is nothing."""
        if self._seg or self._seg_cut:
            return cap_line(self._seg, self._max, self._seg_cut)
        if self._prev is not None:
            return cap_line(self._prev[0], self._max, self._prev[1])
        return None

    def _end(self, out: list, newline: bool) -> None:
        view = self._view()
        if view is None and newline:
            view = ""  # an empty line is a line
        if view is not None and view != self._shown:
            out.append(view)
        self._seg, self._seg_cut, self._prev, self._shown = "", 0, None, None


class LogHandler(logging.Handler):
    """``logging`` records as log lines (stream "logging"), capped as printed lines are."""

    def __init__(self, emit, max_bytes: int = 65536):
        super().__init__()
        self._emit, self._max = emit, max(int(max_bytes), 100)
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        try:
            self._emit("logging", [cap_line(self.format(record), self._max)])
        except Exception:
            self.handleError(record)


def end_lines(streams) -> None:
    """End the open lines of ``streams`` (a chunk returned); flush any other stream."""
    for s in streams:
        try:
            if isinstance(s, Capture):
                s.finish()
            else:
                s.flush()
        except Exception:
            pass
