"""Read-only views of a cluster: job progress, task events, log lines and worker heartbeats.

These are the engine's public observation API; the notebook face and the CLI render them.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Iterator, NamedTuple

from .keys import Keys

__all__ = ["LogLine", "Event", "format_bytes", "format_gpu", "gpu_jobs", "job_progress",
           "iter_logs", "iter_events", "list_workers", "list_jobs", "follow_in_thread",
           "ClusterView"]

_COUNTERS = ("queued", "running", "done", "failed", "cancelled")


class LogLine(NamedTuple):
    """One captured line: ``task`` is the item index (for ``map``) or the submit number."""

    id: str
    time: float
    task: int | None
    worker: str
    host: str
    stream: str  # stdout, stderr or logging
    text: str


class Event(NamedTuple):
    id: str
    time: float
    kind: str  # queued, started, finished, failed, retried, lost, cancelled, closing
    fields: dict


def format_bytes(n) -> str:
    """``1536`` -> ``'1.5 KB'``: sizes in heartbeats, for people."""
    n = float(n or 0)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1024 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def gpu_jobs(g: dict) -> list[str]:
    """The jobs holding one GPU of a heartbeat (``jobs``: several packed tasks may share a
    GPU; ``job``: one of them), without repeats; empty when it is idle."""
    jobs = list(g.get("jobs") or ([g["job"]] if g.get("job") else []))
    return list(dict.fromkeys(jobs))


def format_gpu(g: dict, job_names: dict | None = None) -> str:
    """One GPU of a heartbeat on one line, for people (``miniray status``, text views)::

        gpu 0  NVIDIA H200  util=45%  mem=1.2 GB/140.0 GB  temp=41C  job=1a2b3c4d5e6f.1
        gpu 1  no telemetry  idle

    ``job=`` names the job(s) holding the GPU (with its name in brackets when ``job_names``
    maps the id to one), ``idle`` otherwise; ``task=`` the task(s) running on it; ``reserved=`` the
    memory packed tasks reserved on it; "no telemetry" means the worker has no NVML, so only
    the index is known.
    """
    parts = [f"gpu {g.get('index', '?')}"]
    if g.get("name"):
        parts.append(str(g["name"]))
    measured = False
    if g.get("util") is not None:
        parts.append(f"util={g['util']:.0f}%")
        measured = True
    if g.get("mem_used") is not None and g.get("mem_total"):
        parts.append(f"mem={format_bytes(g['mem_used'])}/{format_bytes(g['mem_total'])}")
        measured = True
    if g.get("temp") is not None:
        parts.append(f"temp={g['temp']}C")
        measured = True
    if not measured:
        parts.append("no telemetry")
    if g.get("reserved"):
        parts.append(f"reserved={format_bytes(g['reserved'])}")
    names = job_names or {}
    jobs = [f"{j} ({names[j]!r})" if names.get(j) else j for j in gpu_jobs(g)]
    tasks = g.get("tasks") or ([g["task"]] if g.get("task") is not None else [])
    if tasks:
        parts.append(f"task={','.join(map(str, tasks))}")
    parts.append(f"job={','.join(jobs)}" if jobs else "idle")
    return "  ".join(parts)


def _d(v):
    return v.decode(errors="replace") if isinstance(v, bytes) else v


def _pairs(flat) -> dict:
    flat = flat or []
    return {_d(flat[i]): _d(flat[i + 1]) for i in range(0, len(flat), 2)}


def job_progress(r, keys: Keys, job: str) -> dict:
    raw = _pairs(r.execute("HGETALL", keys.job(job)))
    out = {c: max(0, int(raw.get(c, 0) or 0)) for c in _COUNTERS}
    out.update(state=raw.get("state", "unknown"), name=raw.get("name", job), job=job,
               priority=int(raw.get("priority", 0) or 0))
    return out


def list_jobs(r, keys: Keys, limit: int = 50) -> list[dict]:
    jobs = [_d(j) for j in r.execute("ZREVRANGE", keys.jobs_all, 0, limit - 1)]
    out = []
    for job in jobs:
        p = job_progress(r, keys, job)
        if p["state"] == "unknown":
            continue
        out.append(p)
    return out


def list_workers(r, keys: Keys) -> list[dict]:
    ids = [_d(w) for w in r.execute("ZRANGE", keys.workers, 0, -1)]
    pipe = r.pipeline()
    for w in ids:
        pipe.command("HGETALL", keys.worker(w))
    out = []
    for w, flat in zip(ids, pipe.execute()):
        h = _pairs(flat)
        if not h:
            continue
        info = json.loads(h.get("info", "{}"))
        info["id"] = w
        info["seen"] = float(h.get("seen", 0))
        out.append(info)
    return out


def _stream_time(entry_id: str) -> float:
    return int(entry_id.split("-")[0]) / 1000.0


def _iter_stream(r, key, follow, timeout, since, stop) -> Iterator[tuple]:
    last = since
    deadline = None if timeout is None else time.monotonic() + timeout
    while True:
        block = None
        if follow:
            block = 500 if deadline is None else max(1, int(min(0.5, deadline - time.monotonic())
                                                            * 1000))
        args = ["XREAD", "COUNT", 1000]
        if block is not None:
            args += ["BLOCK", block]
        got = r.execute(*args, "STREAMS", key, last)
        entries = got[0][1] if got else []
        for entry_id, fields in entries:
            last = _d(entry_id)
            yield last, _pairs(fields)
        if not follow:
            if not entries:
                return
            continue
        if not entries and ((deadline is not None and time.monotonic() >= deadline)
                            or (stop is not None and stop())):
            follow = False  # one more look, for what landed while stop() looked, then the end


def iter_logs(r, keys: Keys, job: str, follow=False, timeout=None, since="0-0",
              stop: Callable[[], bool] | None = None) -> Iterator[LogLine]:
    if since == "$":
        last = r.execute("XREVRANGE", keys.logs(job), "+", "-", "COUNT", 1)
        since = _d(last[0][0]) if last else "0-0"
    for entry_id, f in _iter_stream(r, keys.logs(job), follow, timeout, since, stop):
        task = f.get("task")
        yield LogLine(entry_id, _stream_time(entry_id), int(task) if task not in (None, "") else None,
                      f.get("worker", ""), f.get("host", ""), f.get("stream", ""),
                      f.get("text", ""))


def iter_events(r, keys: Keys, job: str, follow=False, timeout=None, since="0-0",
                stop: Callable[[], bool] | None = None) -> Iterator[Event]:
    for entry_id, f in _iter_stream(r, keys.events(job), follow, timeout, since, stop):
        kind = f.pop("kind", "")
        yield Event(entry_id, _stream_time(entry_id), kind, f)


def follow_in_thread(iterator, fn) -> threading.Thread:
    """Drain ``iterator`` in a daemon thread, calling ``fn`` per item; exceptions end it."""

    def run():
        for item in iterator:
            fn(item)

    t = threading.Thread(target=run, daemon=True, name="miniray-follow")
    t.start()
    return t


class ClusterView:
    """One cluster seen whole, as ``miniray status/logs/cancel`` see it: for consoles and
    notebooks that hold no executor of the job they look at.

    ``url=None`` means ``MINIRAY_REDIS_URL``, else this process's embedded local cluster.

    >>> view = ClusterView()                      # doctest: +SKIP
    >>> [w["name"] for w in view.workers()], view.jobs()[:1]   # doctest: +SKIP
    """

    def __init__(self, url: str | None = None):
        from .broker import Broker, connect
        from .config import settings

        s = settings()
        url = url or s.redis_url
        if url is None:
            from .local import get_local_cluster

            url = get_local_cluster().url
        self.url = url
        self._connect = connect
        self._r = connect(url)
        self._broker = Broker(self._r, s.namespace)
        self.keys = self._broker.keys

    def workers(self) -> list[dict]:
        return list_workers(self._r, self.keys)

    def jobs(self, limit: int = 50) -> list[dict]:
        """The latest jobs, newest first (``job_progress`` dicts)."""
        return list_jobs(self._r, self.keys, limit)

    def find_job(self, job: str | None = None) -> str | None:
        """The id of the job with this id or name (the newest job when None), or None."""
        for j in self.jobs(limit=1 if job is None else 1000):
            if job is None or job in (j["job"], j["name"]):
                return j["job"]
        return None

    def logs(self, job: str, follow: bool = False, timeout: float | None = None):
        """Iterate a job's log lines on a connection of its own, closed at the end."""
        r = self._connect(self.url)
        try:
            yield from iter_logs(r, self.keys, job, follow=follow, timeout=timeout)
        finally:
            r.close()

    def cancel_job(self, job: str) -> int:
        """Cancel a job as ``miniray cancel`` does; returns how many queued chunks were dropped
        (its workers interrupt the running tasks)."""
        return len(self._broker.cancel_job(job))

    def close(self) -> None:
        self._r.close()
