"""The GPU lanes of the notebook display: a bounded utilisation/memory history per GPU, fed from
the workers' heartbeats, and its rendering (meters, inline SVG sparklines, who holds the GPU).

Heartbeats carry ``gpus``: dicts with ``index`` and, with NVML, ``name``, ``util`` (%),
``mem_used``/``mem_total`` (bytes) and ``temp``; ``job`` names the job holding the GPU while a
task runs there. Without NVML a lane shows the GPU, its holder and "no telemetry".
"""

from __future__ import annotations

import html
from collections import deque

from miniray.client.observe import format_bytes, format_gpu, gpu_jobs

from .theme import MUTED, PANE, RUNNING, TRACK

__all__ = ["HISTORY", "GpuHistory", "gpu_row_html", "gpu_text_lines", "meter", "sparkline_svg",
           "worker_key"]

HISTORY = 60  # samples kept per GPU: a minute of heartbeats (one a second)
_UTIL_COLOR, _MEM_COLOR, _MINE_COLOR = "#7b1fa2", "#00897b", "#7b1fa2"


def worker_key(w: dict):
    """What a worker's GPU histories are keyed by: its id (its name where a heartbeat has none)."""
    return w.get("id") or w.get("name")


def _clamp(v: float) -> float:
    return max(0.0, min(1.0, float(v)))


class GpuHistory:
    """The last ``maxlen`` samples of each GPU's utilisation and memory use, both as fractions
    in [0, 1], keyed by ``(worker id, GPU index)``. One sample per heartbeat: reading the same
    heartbeat twice (same ``seen``) adds nothing. Not thread-safe: its owner locks."""

    def __init__(self, maxlen: int = HISTORY):
        self.maxlen = maxlen
        self._util: dict[tuple, deque] = {}
        self._mem: dict[tuple, deque] = {}
        self._seen: dict[str, float | None] = {}

    def update(self, workers: list[dict]) -> None:
        """Add the GPU samples of these heartbeats; forget workers no longer listed."""
        alive = set()
        for w in workers:
            wid = worker_key(w)
            alive.add(wid)
            seen = w.get("seen")
            if seen is not None and self._seen.get(wid) == seen:
                continue
            self._seen[wid] = seen
            for g in w.get("gpus") or []:
                key = (wid, g.get("index"))
                if g.get("util") is not None:
                    self._series(self._util, key).append(_clamp(g["util"] / 100))
                if g.get("mem_used") is not None and g.get("mem_total"):
                    self._series(self._mem, key).append(_clamp(g["mem_used"] / g["mem_total"]))
        for series in (self._util, self._mem):
            for key in [k for k in series if k[0] not in alive]:
                del series[key]
        for wid in [w for w in self._seen if w not in alive]:
            del self._seen[wid]

    def _series(self, table: dict, key: tuple) -> deque:
        if key not in table:
            table[key] = deque(maxlen=self.maxlen)
        return table[key]

    def snapshot(self) -> dict:
        """``{(worker id, GPU index): (util fractions, memory fractions)}``, oldest first."""
        keys = set(self._util) | set(self._mem)
        return {k: (tuple(self._util.get(k, ())), tuple(self._mem.get(k, ()))) for k in keys}


def meter(frac: float, color: str = RUNNING, width: int = 70) -> str:
    """A horizontal bar filled to ``frac`` (0..1), as inline HTML."""
    return (f'<span style="display:inline-block;width:{width}px;height:8px;background:{TRACK};'
            f'border-radius:2px;vertical-align:middle"><span style="display:block;height:8px;'
            f'width:{_clamp(frac) * 100:.0f}%;background:{color};border-radius:2px"></span></span>')


def sparkline_svg(values, label: str = "", color: str = _UTIL_COLOR,
                  maxlen: int = HISTORY, width: int = 60, height: int = 14) -> str:
    """The last ``maxlen`` of ``values`` (fractions 0..1, oldest first) as a small inline SVG.

    The x scale is fixed (one step per sample, the newest at the right edge) so the line moves
    like a strip chart; an empty history draws a dashed baseline (class
    ``miniray-spark-empty``)."""
    values = [_clamp(v) for v in list(values)[-maxlen:]]
    head = (f'<svg class="miniray-spark{" miniray-spark-empty" if not values else ""}" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" '
            f'style="vertical-align:middle;background:{PANE};border-radius:2px">')
    if not values:
        return (head + f"<title>{html.escape(label)}: no samples yet</title>"
                f'<line x1="0" y1="{height - 1}" x2="{width}" y2="{height - 1}" '
                f'stroke="{MUTED}" stroke-dasharray="2,2"/></svg>')
    step, pad = width / max(1, maxlen - 1), 1.0
    points = []
    for i, v in enumerate(values):
        x = width - (len(values) - 1 - i) * step
        y = pad + (1 - v) * (height - 2 * pad)
        points.append((x, y))
    text = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    last_x, last_y = points[-1]
    title = f"{label}: {values[-1] * 100:.0f}% now, last {len(values)} sample(s)"
    return (head + f"<title>{html.escape(title)}</title>"
            f'<polyline points="{text}" fill="none" stroke="{color}" stroke-width="1.2"/>'
            f'<circle cx="{last_x:.1f}" cy="{last_y:.1f}" r="1.5" fill="{color}"/></svg>')


def _holder_html(jobs: list, this_job: str | None) -> str:
    if not jobs:
        return f'<span class="miniray-gpu-holder" style="color:{MUTED}">idle</span>'
    mine = this_job is not None and this_job in jobs
    codes = " ".join(f"<code>{html.escape(str(j))}</code>" for j in jobs)
    if mine:
        others = len(jobs) - 1
        return ('<span class="miniray-gpu-holder miniray-gpu-mine" style="color:#fff;'
                f'background:{_MINE_COLOR};padding:0 4px;border-radius:3px" '
                f'title="held by this map{f" and {others} other job(s)" if others else ""}">'
                f"this map {codes}</span>")
    return f'<span class="miniray-gpu-holder" title="held by another job">job {codes}</span>'


def gpu_row_html(worker_id, g: dict, history: dict | None = None,
                 this_job: str | None = None, colspan: int = 5) -> str:
    """One GPU's lane, a table row: "GPU i" and its name, who holds it (highlighted when it is
    ``this_job``), utilisation and memory meters with their sparklines, temperature; "no
    telemetry" in their place when the heartbeat carries none."""
    index = g.get("index", "?")
    util_hist, mem_hist = (history or {}).get((worker_id, g.get("index")), ((), ()))
    cells = [f"<b>GPU {html.escape(str(index))}</b> {html.escape(str(g.get('name', '')))}",
             _holder_html(gpu_jobs(g), this_job)]
    if g.get("util") is not None:
        cells.append("util " + meter(g["util"] / 100, _UTIL_COLOR) + f" {g['util']:.0f}% "
                     + sparkline_svg(util_hist, f"GPU {index} utilisation", _UTIL_COLOR))
    if g.get("mem_used") is not None and g.get("mem_total"):
        cells.append("mem " + meter(g["mem_used"] / g["mem_total"], _MEM_COLOR)
                     + f" {format_bytes(g['mem_used'])}/{format_bytes(g['mem_total'])} "
                     + sparkline_svg(mem_hist, f"GPU {index} memory", _MEM_COLOR))
    if g.get("temp") is not None:
        cells.append(f"{g['temp']}°C")
    if len(cells) == 2:  # no util, memory or temperature: NVML is absent on that worker
        cells.append(f'<i class="miniray-gpu-none" style="color:{MUTED}">no telemetry</i>')
    if g.get("reserved"):  # packed tasks' reservations (Limits.gpu_memory_gb)
        cells.append(f"reserved {format_bytes(g['reserved'])}")
    return (f'<tr class="miniray-gpu" data-gpu="{html.escape(str(index))}"><td></td>'
            f'<td colspan="{colspan}">' + " &nbsp; ".join(cells) + "</td></tr>")


def gpu_text_lines(workers: list[dict], this_job: str | None = None) -> list[str]:
    """One short line per GPU, for the text fallback: ``w0: gpu 0  A100  util=80% ...``."""
    lines = []
    for w in workers:
        for g in w.get("gpus") or []:
            mine = " (this map)" if this_job is not None and this_job in gpu_jobs(g) else ""
            lines.append(f"  {w.get('name', w.get('id', '?'))}: {format_gpu(g)}{mine}")
    return lines
