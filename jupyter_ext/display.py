"""The rendering half of the progress display: the live widget, the text view, and the HTML
parts both the live widget and the static snapshot are drawn from.

Views read a :class:`~jupyter_ext.progress.MapProgress` and a :class:`~jupyter_ext.logs.LogBuffer`
and never count anything themselves; the lanes are drawn by ``lanes.py``/``gpus.py``, per-item
timing by ``timeline.py``, the widget's browser side lives in ``widget.py``. ``make_view`` is the
one place that decides which view is used. ``render()`` is called from the map's updater thread:
the widget view only sets traits there (never ``with output:``, which lands in whatever cell is
current: ipywidgets#4020).
"""

from __future__ import annotations

import html
import sys
import time

from .gpus import gpu_text_lines
from .lanes import lanes_html
from .logs import format_line
from .progress import format_seconds
from .theme import CACHED, CANCELLED, DONE, FAILED, MONO, PANE, RUNNING, STATE_COLOR, TEXT, TRACK
from .timeline import stragglers_html, timeline_html

__all__ = ["make_view", "WidgetView", "TextView", "widgets_available", "bar_html", "head_html",
           "errors_html", "lanes_html", "counts_line", "percent_done", "text_report"]

LOG_LINES = 200  # log lines the live widget holds (the browser filters them by worker)


def widgets_available() -> bool:
    """True in a Jupyter kernel with ipywidgets and anywidget installed (a frontend can show
    widgets)."""
    try:
        import anywidget  # noqa: F401
        import ipywidgets  # noqa: F401
        from IPython import get_ipython
    except ImportError:
        return False
    shell = get_ipython()
    return shell is not None and getattr(shell, "kernel", None) is not None


def make_view(progress, logs, on_cancel=None, kind: str | None = None):
    """The view for this frontend: ``"widget"`` in a kernel with ipywidgets, else ``"text"``."""
    if kind is None:
        kind = "widget" if widgets_available() else "text"
    if kind == "widget":
        return WidgetView(progress, logs, on_cancel)
    if kind == "text":
        return TextView(progress, logs)
    raise ValueError(f"unknown progress view {kind!r}; use 'widget' or 'text'")


def counts_line(s: dict) -> str:
    parts = [f"{s['done']} done", f"{s['failed']} failed", f"{s['running']} running",
             f"{s['queued']} queued"]
    if s.get("cached"):
        parts.insert(1, f"{s['cached']} cached")
    if s["cancelled"]:
        parts.append(f"{s['cancelled']} cancelled")
    parts.append(f"{s['rate']:.1f}/s")
    if s["state"] == "running":
        parts.append("ETA " + ("?" if s["eta"] is None else format_seconds(s["eta"])))
    else:
        parts.append(f"took {format_seconds(s['elapsed'])}")
    return " · ".join(parts)


def percent_done(s: dict) -> int:
    """Items done (succeeded) as a whole percentage, rounded down: 100 only when all are."""
    return 100 if not s["total"] else s["done"] * 100 // s["total"]


def bar_html(s: dict) -> str:
    """The overall bar: done, cached (done without running), failed, cancelled and running
    (striped) segments, each in its own colour, over the track of what is still queued. Once
    a map is cancelled, every item that did not finish counts as cancelled."""
    total = max(1, s["total"])
    counts = dict(s)
    counts["cached"] = s.get("cached", 0)
    counts["done"] = s["done"] - counts["cached"]  # (the cached segment shows the rest)
    if s["state"] == "cancelled":  # what did not finish never will (some may still settle)
        counts["cancelled"] = max(0, s["total"] - s["done"] - s["failed"])
    segments = []
    for key, color in (("done", DONE), ("cached", CACHED), ("failed", FAILED),
                       ("cancelled", CANCELLED), ("running", RUNNING)):
        n = min(counts[key], total)
        if not n:
            continue
        fill = (f"repeating-linear-gradient(45deg,{color} 0 4px,transparent 4px 8px)"
                if key == "running" else color)
        segments.append(f'<div class="miniray-bar-{key}" title="{n} {key}" '
                        f'style="width:{n / total * 100:.2f}%;background:{fill}"></div>')
    return (f'<div class="miniray-bar" style="display:flex;flex:1 1 30%;min-width:160px;'
            f'max-width:480px;height:12px;background:{TRACK};border-radius:3px;overflow:hidden"'
            f' title="{s["queued"]} queued">{"".join(segments)}</div>'
            f'<span class="miniray-pct" style="min-width:3em">{percent_done(s)}%</span>')


def job_html(s: dict) -> str:
    """The job id (what ``%miniray attach``, ``cancel`` and ``logs`` take), if known."""
    if not s.get("job"):
        return ""
    return f' <span class="miniray-job">job <code>{html.escape(s["job"])}</code></span>'


def head_html(s: dict) -> str:
    """Title, state, bar and counts on one (wrapping) line."""
    state = s["state"]
    return ('<div class="miniray-headline" style="display:flex;align-items:center;gap:8px;'
            'flex-wrap:wrap"><span style="white-space:nowrap"><b>miniray map</b> '
            f'<code>{html.escape(s["name"])}</code> <b class="miniray-state" '
            f'style="color:{STATE_COLOR[state]}">{state}</b>{job_html(s)}</span>{bar_html(s)}'
            f'<span class="miniray-counts">{html.escape(counts_line(s))}</span></div>')


def text_report(progress) -> str:
    """The summary line, then one short line per GPU the workers have (none before the first
    heartbeats are read, so a view displayed before its map starts shows the summary alone)."""
    s = progress.snapshot()
    return "\n".join([progress.summary(), *gpu_text_lines(s["workers"], s["job"])])


def errors_html(groups: list) -> str:
    """Exception type x count x hosts, each row expandable to one traceback and its item."""
    if not groups:
        return ""
    rows = []
    for g in groups:
        items = ", ".join(str(i) for i in g.items) + ("..." if g.count > len(g.items) else "")
        rows.append(
            f"<details><summary style='cursor:pointer'><b style='color:{FAILED}'>"
            f"{html.escape(g.type)}</b> × {g.count}"
            f" on {html.escape(', '.join(g.hosts) or '?')} — items {items}</summary>"
            f"<div>traceback of item {g.first}:</div>"
            f"<pre style='font-size:11px;max-height:240px;overflow:auto;margin:2px 0;"
            f"font-family:{MONO};background:{PANE};color:{TEXT}'>"
            f"{html.escape(g.traceback)}</pre></details>")
    return '<div class="miniray-errors">' + "".join(rows) + "</div>"


def live_parts(s: dict) -> dict:
    """The HTML parts of the live widget (the log pane is drawn in the browser)."""
    running = s["state"] == "running"
    return {"head": head_html(s),
            "lanes": lanes_html(s["workers"], s["by_worker"], s["gpu_history"], s["job"])
            if running else "",  # lanes end with the map: idle
            "stragglers": stragglers_html(s["stragglers"], running),
            "errors": errors_html(s["errors"]),
            "timeline": "" if running else timeline_html(s["timings"])}


def hidden_note(hidden: int, job: str | None) -> str:
    if hidden <= 0:
        return ""
    return f"{hidden} earlier line(s) hidden: %miniray logs {job or 'JOB'} shows them all"


class WidgetView:
    """The live widget (``widget.MapWidget``): header with the bar, worker lanes, stragglers,
    log pane with a per-worker filter, error table and, at the end, the timeline."""

    def __init__(self, progress, logs, on_cancel=None):
        from .widget import MapWidget

        self.progress, self.logs, self._on_cancel = progress, logs, on_cancel
        self.widget = MapWidget(cancellable=on_cancel is not None)
        self.widget.on_msg(self._on_msg)
        self.parts: dict = {}
        self._log_version = -1
        self.render()

    def _on_msg(self, _widget, content, _buffers) -> None:
        if isinstance(content, dict) and content.get("event") == "cancel":
            self.cancel()

    def cancel(self) -> None:
        if self._on_cancel is not None:
            self._on_cancel()

    def render(self) -> None:
        s = self.progress.snapshot()
        parts = live_parts(s)
        w = self.widget
        with w.hold_sync():
            for key, html_part in parts.items():
                if self.parts.get(key) != html_part:
                    setattr(w, key, html_part)
            self.parts = parts
            if w.state != s["state"]:
                w.state = s["state"]
            version = self.logs.version
            if version != self._log_version:
                self._log_version = version
                entries, hidden = self.logs.tail(LOG_LINES)
                w.logs = [[seq, ln.worker, format_line(ln), ln.stream == "stderr"]
                          for seq, ln in entries]
                w.log_workers = list(self.logs.workers)
                w.log_note = hidden_note(hidden, s["job"])

    def finish(self) -> None:
        self.render()

    def _repr_mimebundle_(self, include=None, exclude=None):
        data = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        if isinstance(data, tuple):
            data = data[0]
        data = dict(data or {})
        data["text/plain"] = text_report(self.progress)
        return data


class TextView:
    """Progress as text: a carriage-return line on a terminal; as its value, the summary line
    and a line per GPU (``text_report``)."""

    def __init__(self, progress, logs, stream=None):
        self.progress, self.logs = progress, logs
        self.stream = stream if stream is not None else sys.stdout
        self._last = 0.0

    def _tty(self) -> bool:
        """Whether the stream is a terminal (a closed one, e.g. a test's capture that ended
        while a --bg map ran on, is not: the view's thread must not fail on it)."""
        try:
            isatty = getattr(self.stream, "isatty", None)
            return bool(isatty and isatty())
        except (ValueError, OSError):
            return False

    def render(self) -> None:
        if not self._tty():
            return
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        self.stream.write("\r" + self.progress.summary()[:160] + "\x1b[K")
        self.stream.flush()

    def finish(self) -> None:
        if self._tty():
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": text_report(self.progress)}
