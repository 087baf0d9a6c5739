"""The rendering half of the progress display: a live ipywidgets view and a text view.

Both read a :class:`~jupyter_ext.progress.MapProgress` and a :class:`~jupyter_ext.logs.LogBuffer`
and never count anything themselves; the GPU lanes are drawn by ``gpus.py``. ``make_view`` is
the one place that decides which is used. ``render()`` is called from the map's updater thread:
the widget view only sets traits there (never ``with output:``, which lands in whatever cell is
current: ipywidgets#4020).
"""

from __future__ import annotations

import html
import sys
import time

from miniray.observe import format_bytes

from .gpus import gpu_row_html, gpu_text_lines, meter, worker_key
from .progress import format_seconds

__all__ = ["make_view", "WidgetView", "TextView", "widgets_available"]

_STYLE = {"running": "info", "done": "success", "failed": "danger", "cancelled": "warning"}
_COLOR = {"running": "#1976d2", "done": "#2e7d32", "failed": "#c62828", "cancelled": "#ef6c00"}


def widgets_available() -> bool:
    """True in a Jupyter kernel with ipywidgets installed (a frontend can show widgets)."""
    try:
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


def _bytes(n) -> str:
    return format_bytes(n)


def counts_line(s: dict) -> str:
    parts = [f"{s['done']} done", f"{s['failed']} failed", f"{s['running']} running",
             f"{s['queued']} queued"]
    if s["cancelled"]:
        parts.append(f"{s['cancelled']} cancelled")
    parts.append(f"{s['rate']:.1f}/s")
    if s["state"] == "running":
        parts.append("ETA " + ("?" if s["eta"] is None else format_seconds(s["eta"])))
    else:
        parts.append(f"took {format_seconds(s['elapsed'])}")
    return " · ".join(parts)


def lanes_html(workers: list[dict], by_worker: dict | None = None,
               gpu_history: dict | None = None, job: str | None = None) -> str:
    """A row per worker (and a lane per GPU it has): slots busy, items of this map it finished
    (``by_worker``, keyed by worker id), CPU, RAM; per GPU its holder (``job``: this map's, to
    highlight), utilisation and memory with sparklines of ``gpu_history``
    (``GpuHistory.snapshot()``)."""
    by_worker = by_worker or {}
    if not workers:
        return '<div class="miniray-lanes"><i>waiting for workers...</i></div>'
    rows = []
    for w in workers:
        slots, busy = int(w.get("slots") or 1), int(w.get("busy") or 0)
        boxes = "".join(
            f'<span style="display:inline-block;width:9px;height:9px;margin-right:2px;'
            f'background:{"#1976d2" if i < busy else "#e0e0e0"}"></span>' for i in range(slots))
        cpu = w.get("cpu_percent")
        ram = (f"{_bytes(w['ram_used'])}/{_bytes(w['ram_total'])}"
               if "ram_used" in w and "ram_total" in w else "")
        rows.append(
            f"<tr><td><b>{html.escape(str(w.get('name', w.get('id', '?'))))}</b></td>"
            f"<td>{html.escape(str(w.get('host', '')))}</td><td>{boxes} {busy}/{slots}</td>"
            f"<td title='tasks done by this worker since it started: "
            f"{w.get('tasks_done', 0)}'>{by_worker.get(w.get('id'), 0)} items</td>"
            f"<td>{'' if cpu is None else 'CPU ' + meter(cpu / 100) + f' {cpu:.0f}%'}</td>"
            f"<td>{ram}</td></tr>")
        for g in w.get("gpus") or []:
            rows.append(gpu_row_html(worker_key(w), g, gpu_history, job))
    body = "".join(rows).replace("<td", '<td style="padding:1px 10px 1px 0"')
    return ('<table class="miniray-lanes" style="font-size:12px;border-collapse:collapse">'
            + body + "</table>")


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
            f"<details><summary><b style='color:#c62828'>{html.escape(g.type)}</b> × {g.count}"
            f" on {html.escape(', '.join(g.hosts) or '?')} — items {items}</summary>"
            f"<div>traceback of item {g.first}:</div>"
            "<pre style='font-size:11px;max-height:240px;overflow:auto;"
            "background:var(--jp-rendermime-error-background,#fff5f5);"
            "color:var(--jp-content-font-color1,inherit)'>"
            f"{html.escape(g.traceback)}</pre></details>")
    return '<div class="miniray-errors">' + "".join(rows) + "</div>"


class WidgetView:
    """The live widget: overall bar, worker lanes, log pane with a filter, error table."""

    def __init__(self, progress, logs, on_cancel=None):
        import ipywidgets as w

        self.progress, self.logs, self._on_cancel = progress, logs, on_cancel
        self.title = w.HTML(layout=w.Layout(flex="0 0 auto"))
        self.bar = w.IntProgress(value=0, min=0, max=max(1, progress.total), bar_style="info",
                                 layout=w.Layout(flex="1 1 30%", min_width="160px"))
        self.bar.add_class("miniray-bar")
        self.counts = w.HTML(layout=w.Layout(flex="0 1 auto"))
        self.cancel_button = w.Button(description="Cancel", button_style="danger",
                                      icon="stop", layout=w.Layout(width="90px"),
                                      tooltip="cancel this map (queued items are dropped)")
        self.cancel_button.on_click(lambda _: self.cancel())
        self.cancel_button.layout.display = "none" if on_cancel is None else None
        self.lanes = w.HTML()
        self.filter = w.Dropdown(options=[("all workers", "")], value="",
                                 layout=w.Layout(width="200px"))
        self.filter.observe(lambda _: self._render_logs(force=True), names="value")
        self.log_pane = w.HTML()
        self.errors = w.HTML()
        header = w.HBox([self.title, self.bar, self.counts, self.cancel_button],
                        layout=w.Layout(flex_flow="row wrap", align_items="center"))
        logs_box = w.VBox([w.HBox([w.HTML("<b>logs</b>"), self.filter]), self.log_pane])
        self.box = w.VBox([header, self.lanes, logs_box, self.errors])
        self.box.add_class("miniray-map")
        self._log_version = -1
        self._state = None
        self.render()

    def cancel(self) -> None:
        if self._on_cancel is not None:
            self.cancel_button.disabled = True
            self.cancel_button.description = "cancelling"
            self._on_cancel()

    def render(self) -> None:
        s = self.progress.snapshot()
        state = s["state"]
        self.title.value = (f'<span style="white-space:nowrap"><b>miniray map</b> '
                            f'<code>{html.escape(s["name"])}</code> '
                            f'<b class="miniray-state" style="color:{_COLOR[state]}">'
                            f'{state}</b></span>')
        self.bar.value = s["done"] + s["failed"] + s["cancelled"]
        self.bar.bar_style = _STYLE[state]
        self.bar.description = f"{s['fraction'] * 100:.0f}%"
        self.counts.value = f'<span class="miniray-counts">{html.escape(counts_line(s))}</span>'
        self.lanes.value = lanes_html(s["workers"], s["by_worker"], s["gpu_history"], s["job"])
        self.errors.value = errors_html(s["errors"])
        if state != "running":
            self.cancel_button.disabled = True
            self.cancel_button.description = state
        self._render_logs(force=state != self._state)
        self._state = state

    def _render_logs(self, force: bool = False) -> None:
        version = self.logs.version
        if version == self._log_version and not force:
            return
        self._log_version = version
        workers = [("all workers", "")] + [(w, w) for w in self.logs.workers]
        if len(workers) != len(self.filter.options):
            self.filter.options = workers
        text = self.logs.text(self.filter.value or None)
        self.log_pane.value = (
            '<pre class="miniray-logs" style="font-size:11px;max-height:180px;overflow:auto;'
            'margin:0;background:var(--jp-layout-color2,#f7f7f7);'
            'color:var(--jp-content-font-color1,inherit);'
            'display:flex;flex-direction:column-reverse">'
            f"<span>{html.escape(text) or self._no_output()}</span></pre>")

    def _no_output(self) -> str:
        return "(no output yet)" if self.progress.state == "running" else "(no output)"

    def finish(self) -> None:
        self.render()

    def _repr_mimebundle_(self, include=None, exclude=None):
        data = self.box._repr_mimebundle_(include=include, exclude=exclude)
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

    def render(self) -> None:
        isatty = getattr(self.stream, "isatty", None)
        if not (isatty and isatty()):
            return
        now = time.monotonic()
        if now - self._last < 0.5:
            return
        self._last = now
        self.stream.write("\r" + self.progress.summary()[:160] + "\x1b[K")
        self.stream.flush()

    def finish(self) -> None:
        isatty = getattr(self.stream, "isatty", None)
        if isatty and isatty():
            self.stream.write("\r\x1b[K")
            self.stream.flush()

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": text_report(self.progress)}
