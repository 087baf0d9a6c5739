"""What a map leaves in the notebook when it ends: its final state as static HTML (bar and
counts, slowest items, timeline, error table, the last log lines) plus the text summary.

The live widget only lives as long as the kernel; a saved notebook, reopened or rendered on
GitHub/nbviewer, shows this instead of "model not found". Inline styles only, with JupyterLab's
CSS variables and light fallbacks.
"""

from __future__ import annotations

import html

from .display import errors_html, head_html, hidden_note, text_report
from .logs import format_line
from .theme import MONO, MUTED, PANE, TEXT
from .timeline import stragglers_html, timeline_html

__all__ = ["snapshot_html", "snapshot_bundle", "SNAPSHOT_LOG_LINES"]

SNAPSHOT_LOG_LINES = 20


def _logs_html(logs, job) -> str:
    entries, hidden = logs.tail(SNAPSHOT_LOG_LINES)
    if not entries:
        return ""
    text = "\n".join(format_line(ln) for _, ln in entries)
    note = hidden_note(hidden, job)
    return (f'<div class="miniray-logs-static" style="margin-top:4px"><b>logs</b> '
            f'<span style="color:{MUTED}">{html.escape(note)}</span>'
            f'<pre style="font-size:11px;overflow:auto;margin:2px 0;'
            f'padding:2px 4px;font-family:{MONO};background:{PANE};color:{TEXT}">'
            f"{html.escape(text)}</pre></div>")


def snapshot_html(progress, logs) -> str:
    s = progress.snapshot()
    return (f'<div class="miniray-snapshot" style="font-size:12px;color:{TEXT}">'
            + head_html(s) + stragglers_html(s["stragglers"], s["state"] == "running")
            + timeline_html(s["timings"]) + errors_html(s["errors"]) + _logs_html(logs, s["job"])
            + "</div>")


def snapshot_bundle(progress, logs) -> dict:
    """The mime bundle that replaces the live widget: text/plain and text/html only."""
    return {"text/plain": text_report(progress), "text/html": snapshot_html(progress, logs)}
