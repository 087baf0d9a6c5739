"""The worker lanes of the live view: a row per worker with its slots, the items of this map it
finished and its own CPU and memory (the worker and its task processes, from the heartbeat's
``proc_cpu_percent``/``proc_rss``), a lane per GPU it has (``gpus.py``), and the machine's
totals once per host.
"""

from __future__ import annotations

import html

from miniray.client.observe import format_bytes

from .gpus import gpu_row_html, meter, worker_key
from .theme import MUTED, RUNNING, TRACK

__all__ = ["lanes_html"]


def _slots(busy: int, slots: int) -> str:
    return "".join(
        f'<span style="display:inline-block;width:9px;height:9px;margin-right:2px;'
        f'border-radius:1px;background:{RUNNING if i < busy else TRACK}"></span>'
        for i in range(slots))


def _own_usage(w: dict) -> str:
    """The worker's own CPU (100% = one core) and memory; nothing when the heartbeat lacks them
    (never the machine's totals, which would repeat on every lane of the host)."""
    cells = []
    cpu = w.get("proc_cpu_percent")
    if cpu is not None:
        cores = max(1, int(w.get("slots") or 1))
        cells.append(f'<span title="this worker and its task processes; 100% is one core">CPU '
                     f"{meter(cpu / 100 / cores)} {cpu:.0f}%</span>")
    rss = w.get("proc_rss")
    if rss is not None:
        cells.append(f'<span title="resident memory of this worker and its task processes">'
                     f"RSS {format_bytes(rss)}</span>")
    return " ".join(cells)


def _host_row(host: str, w: dict, colspan: int) -> str:
    cpu = w.get("cpu_percent")
    parts = [f"<b>{html.escape(host or '?')}</b>"]
    if cpu is not None:
        parts.append(f"machine CPU {meter(cpu / 100)} {cpu:.0f}%")
    if w.get("ram_used") is not None and w.get("ram_total"):
        parts.append(f"RAM {format_bytes(w['ram_used'])}/{format_bytes(w['ram_total'])}")
    return (f'<tr class="miniray-host" style="color:{MUTED}"><td colspan="{colspan}">'
            + " &nbsp; ".join(parts) + "</td></tr>")


def lanes_html(workers: list[dict], by_worker: dict | None = None,
               gpu_history: dict | None = None, job: str | None = None) -> str:
    """A row per worker (and a lane per GPU it has) under a row per host with the machine's
    CPU and RAM: slots busy, items of this map it finished (``by_worker``, keyed by worker id),
    its own CPU and memory when the heartbeat has them; per GPU its holder (``job``: this
    map's, to highlight), utilisation and memory with sparklines of ``gpu_history``
    (``GpuHistory.snapshot()``)."""
    by_worker = by_worker or {}
    if not workers:
        return (f'<div class="miniray-lanes" style="color:{MUTED}"><i>waiting for workers...'
                "</i></div>")
    rows, host = [], object()
    for w in workers:  # sorted by host, then name (MapProgress.set_workers)
        if w.get("host", "") != host:
            host = w.get("host", "")
            rows.append(_host_row(host, w, 5))
        slots, busy = int(w.get("slots") or 1), int(w.get("busy") or 0)
        rows.append(
            f"<tr><td><b>{html.escape(str(w.get('name', w.get('id', '?'))))}</b></td>"
            f"<td>{_slots(busy, slots)} {busy}/{slots}</td>"
            f"<td title='tasks done by this worker since it started: "
            f"{w.get('tasks_done', 0)}'>{by_worker.get(w.get('id'), 0)} items</td>"
            f"<td>{_own_usage(w)}</td><td></td></tr>")
        for g in w.get("gpus") or []:
            rows.append(gpu_row_html(worker_key(w), g, gpu_history, job, colspan=4))
    body = "".join(rows).replace("<td", '<td style="padding:1px 10px 1px 0"')
    return ('<table class="miniray-lanes" style="font-size:12px;border-collapse:collapse">'
            + body + "</table>")
