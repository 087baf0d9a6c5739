"""Per-item timing in the display: the stragglers (items running longest, or at the end the
slowest) and the end-of-map timeline, a row per worker slot with a bar per item, like Dask's
task stream but inline. Static HTML with inline styles, so the live widget and the snapshot a
saved notebook keeps draw the same thing.
"""

from __future__ import annotations

import html

from .progress import format_seconds
from .theme import BORDER, DONE, FAILED, MUTED, PANE

__all__ = ["stragglers_html", "timeline_html", "MAX_BARS"]

MAX_BARS = 1500  # past this many items the timeline draws the slowest (and says so)
_TINY = 0.005  # a bar under this share of the timeline merges with its neighbours


def stragglers_html(stragglers: list, running: bool) -> str:
    """``stragglers``: ``(item, seconds, still running)``, longest first."""
    if not stragglers:
        return ""
    head = "running longest" if running else "slowest items"
    items = ", ".join(f"<b>#{i}</b> {format_seconds(sec)}" for i, sec, _ in stragglers)
    return (f'<div class="miniray-stragglers" style="font-size:12px;margin:2px 0">'
            f'<span style="color:{MUTED}">{head}:</span> {items}</div>')


def _row_key(t) -> tuple:
    return (str(t.worker or "?"), -1 if t.slot is None else t.slot)


def _segments(bars: list, t0: float, span: float) -> list:
    """One row's bars in time order, as ``(first item, last item, items, start, end,
    failed)``: items too short to tell apart at this scale (under ``_TINY`` of the span, and
    as close to the one before) are drawn as one bar, so a map of thousands of quick items
    stays a few kilobytes; a failed item, or one long enough to see, keeps its own bar."""
    tiny = _TINY * span
    out: list = []
    for t in sorted(bars, key=lambda t: t.started):
        small = not t.failed and t.seconds < tiny
        if out and small and out[-1][6] and t.started - out[-1][4] <= tiny:
            seg = out[-1]
            seg[1], seg[2], seg[4] = t.index, seg[2] + 1, max(seg[4], t.finished)
            continue
        out.append([t.index, t.index, 1, t.started, t.finished, t.failed, small])
    return [tuple(seg[:6]) for seg in out]


def timeline_html(timings: list) -> str:
    """A row per worker slot, a bar per item at its start and as long as it ran; hovering a bar
    names the item and its duration; failed items in the error colour. Empty without
    timings (the engine did not time the items)."""
    if not timings:
        return ""
    shown = timings
    note = ""
    if len(timings) > MAX_BARS:
        shown = sorted(timings, key=lambda t: -t.seconds)[:MAX_BARS]
        note = f" (the {MAX_BARS} slowest of {len(timings)} items)"
    t0 = min(t.started for t in timings)
    span = max(max(t.finished for t in timings) - t0, 1e-6)
    rows: dict[tuple, list] = {}
    for t in shown:
        rows.setdefault(_row_key(t), []).append(t)
    out = []
    for (worker, slot), bars in sorted(rows.items()):
        label = worker if slot < 0 else f"{worker} / {slot}"
        cells = []
        for first, last, n, start, end, failed in _segments(bars, t0, span):
            left = (start - t0) / span * 100
            width = max((end - start) / span * 100, 0.15)
            if n == 1:
                what = "failed after" if failed else "took"
                title = f"item {first} {what} {format_seconds(end - start)}"
            else:
                title = f"{n} items ({first}..{last}) in {format_seconds(end - start)}"
            cells.append(
                f'<div title="{title}" '
                f'style="position:absolute;top:1px;bottom:1px;left:{left:.2f}%;'
                f'width:{width:.2f}%;min-width:2px;border-radius:1px;'
                f'background:{FAILED if failed else DONE}"></div>')
        out.append(
            '<div style="display:flex;align-items:center;margin:1px 0">'
            f'<span style="flex:0 0 150px;overflow:hidden;text-overflow:ellipsis;'
            f'white-space:nowrap;color:{MUTED}">{html.escape(label)}</span>'
            f'<div style="position:relative;flex:1 1 auto;height:12px;background:{PANE};'
            f'border-radius:2px">{"".join(cells)}</div></div>')
    return (f'<details class="miniray-timeline" open style="font-size:11px;margin:4px 0">'
            f'<summary style="cursor:pointer">timeline: {len(rows)} worker slot(s), '
            f"{format_seconds(span)}{note}</summary>" + "".join(out)
            + f'<div style="display:flex;color:{MUTED};margin-left:150px;'
            f'border-top:1px solid {BORDER}"><span style="flex:1">0s</span>'
            f"<span>{format_seconds(span)}</span></div></details>")
