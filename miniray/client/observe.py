"""Read-only views of a cluster: job progress, task events, log lines and worker heartbeats.

These are the engine's public observation API; the notebook face and the CLI render them
(``format_status`` is the text of both ``miniray status`` and ``%miniray status``).

A job's counters (``job_progress``) count items: ``queued`` (waiting for a worker),
``running``, ``done``, ``failed`` and ``cancelled`` (dropped before running, or interrupted
by a cancel). Each item is counted once, when it ends, by the script that records its
outcome; when a job ends, its executor (which settles every item's future) writes the final
counters, so ``Executor.progress()``, ``miniray status`` and the notebook's widget agree.
``status`` says where the job is in words: queued, running, done, failed (some items failed,
or the job was given up: ``orphaned``, its client went silent) or cancelled.

A worker's heartbeat (``list_workers``) has: ``name``, ``host``, ``pid``, ``slots``, ``busy`` (slots
running a task now), ``jobs`` (the job of each busy slot), ``tasks_done`` (items this worker
finished, counted as each outcome is recorded), ``started`` (epoch seconds), ``cpus``; the machine's
``cpu_percent``, ``ram_used`` and ``ram_total``; the worker's own ``proc_cpu_percent`` (the worker
process and its task processes, 100 = one core busy) and ``proc_rss`` (their resident memory,
bytes); ``isolation``; ``gpus`` (one dict per GPU, see ``format_gpu``; ``uuid`` when known) and
``gpu_note`` (which GPUs the worker owns and why: ``--gpus``, ``CUDA_VISIBLE_DEVICES`` or NVML, see
``miniray.worker.gpu``), ``shm`` (which ``/dev/shm`` it sees: ``miniray.values.shm.domain``),
``triton`` when it has one; and ``seen`` (the server's time of the heartbeat).
"""

from __future__ import annotations

import json
import threading
import time
from typing import Callable, Iterator, NamedTuple

from miniray.keys import Keys

__all__ = ["LogLine", "Event", "format_bytes", "format_duration", "format_gpu",
           "format_status", "gpu_jobs",
           "job_progress", "job_status", "iter_logs", "iter_events", "list_workers",
           "list_jobs", "follow_in_thread", "ClusterView"]

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
    kind: str  # queued, started, finished, failed, retried, lost, stopped, cancelled, closing
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


def format_duration(seconds) -> str:
    """``75.3`` -> ``'1m 15s'``, ``4000`` -> ``'1h 06m'``: a job's duration, for people."""
    if seconds is None:
        return "-"
    seconds = max(0.0, float(seconds))
    if seconds < 60:
        return f"{seconds:.1f}s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m}m {s:02d}s"
    h, m = divmod(m, 60)
    return f"{h}h {m:02d}m" if h < 24 else f"{h // 24}d {h % 24:02d}h"


def _local_time(t, now: float) -> str:
    if not t:
        return "-"
    lt = time.localtime(t)
    same_day = time.localtime(now)[:3] == lt[:3]
    return time.strftime("%H:%M:%S" if same_day else "%Y-%m-%d %H:%M:%S", lt)


def _table(header: list, rows: list, extra: dict | None = None) -> list:
    """Rows of cells as aligned lines (indented by two); ``extra`` maps a row's index to
    lines printed under it (a worker's GPUs)."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    def line(cells):
        return "  " + "  ".join(str(c).ljust(w) for c, w in zip(cells, widths)).rstrip()
    out = [line(header)]
    for i, r in enumerate(rows):
        out.append(line(r))
        out += (extra or {}).get(i, [])
    return out


def format_status(workers: list, jobs: list, now: float | None = None) -> str:
    """The text of ``miniray status`` and ``%miniray status``: a table of the workers (busy
    slots, items done, the worker's own CPU and memory, the machine's, GPUs) and one of the
    jobs, newest first (id, name, state in words, counters, start in local time, duration)::

        workers: 1
          NAME  HOST  BUSY  TASKS DONE  CPU  MEMORY    MACHINE CPU  MACHINE RAM     GPUS
          w0    vm    0/2   1000        0%   120.5 MB  12%          2.1 GB/7.8 GB   none
        jobs: 1
          JOB             NAME      STATE  QUEUED  RUNNING  DONE  FAILED  CANCELLED  STARTED ...
          1a2b3c4d5e6f.0  'resize'  done   0       0        1000  0       0          14:52:01 ...
    """
    now = time.time() if now is None else now
    names = {j["job"]: j["name"] for j in jobs}  # the GPU lines name their holding jobs
    workers = sorted(workers, key=lambda w: (str(w.get("host", "")), str(w.get("name", ""))))
    rows, extra = [], {}
    for i, w in enumerate(workers):
        gpus = w.get("gpus") or []
        cpu = w.get("proc_cpu_percent")
        rows.append([w.get("name", w.get("id", "?")), w.get("host", "?"),
                     f"{w.get('busy', 0)}/{w.get('slots', '?')}", w.get("tasks_done", 0),
                     "-" if cpu is None else f"{cpu:.0f}%",
                     "-" if w.get("proc_rss") is None else format_bytes(w["proc_rss"]),
                     f"{w.get('cpu_percent', 0):.0f}%",
                     f"{format_bytes(w.get('ram_used'))}/{format_bytes(w.get('ram_total'))}",
                     len(gpus) or "none"])
        lines = [f"        {format_gpu(g, names)}" for g in gpus]
        t = w.get("triton")
        if t:  # the node's Triton server (worker --triton)
            error = (t.get("error") or "").split("\n")[0]
            lines.append(f"        triton {'ready' if t.get('ready') else 'NOT READY'} "
                         f"{t.get('url')}{'' if t.get('managed') else ' (attached)'}"
                         f"  models={','.join(t.get('models') or []) or '-'}"
                         f"  restarts={t.get('restarts', 0)}{'  ' + error if error else ''}")
        extra[i] = lines
    out = [f"workers: {len(workers)}"]
    if workers:
        out += _table(["NAME", "HOST", "BUSY", "TASKS DONE", "CPU", "MEMORY", "MACHINE CPU",
                       "MACHINE RAM", "GPUS"], rows, extra)
    jrows, given_up = [], False
    for j in jobs:
        status = j.get("status") or job_status(j)
        if j.get("state") == "orphaned":
            status, given_up = "failed*", True
        created, finished = j.get("created"), j.get("finished")
        duration = None if not created else (finished or now) - created
        name = repr(j["name"])
        jrows.append([j["job"], name if len(name) <= 40 else name[:38] + "…" + name[0], status,
                      j["queued"], j["running"], j["done"], j["failed"], j["cancelled"],
                      _local_time(created, now), format_duration(duration)])
    out.append(f"jobs: {len(jobs)}")
    if jobs:
        out += _table(["JOB", "NAME", "STATE", "QUEUED", "RUNNING", "DONE", "FAILED",
                       "CANCELLED", "STARTED", "DURATION"], jrows)
    if given_up:
        out.append("  * given up: its client was silent longer than its grace "
                   "(MINIRAY_CLIENT_GRACE_SECONDS)")
    return "\n".join(out)


def _d(v):
    return v.decode(errors="replace") if isinstance(v, bytes) else v


def _pairs(flat) -> dict:
    flat = flat or []
    return {_d(flat[i]): _d(flat[i + 1]) for i in range(0, len(flat), 2)}


def job_status(p: dict) -> str:
    """A job's ``state`` (as the server keeps it: open, closing, done, cancelled, orphaned)
    and counters in a word users know: queued, running, done, failed or cancelled."""
    state = p.get("state")
    if state == "cancelled":
        return "cancelled"
    if state == "orphaned":
        return "failed"  # given up: its client went silent for its grace
    if state in ("open", "closing"):
        if p.get("running"):
            return "running"
        if p.get("queued"):
            return "queued"
    return "failed" if p.get("failed") else "done"


def _float(v):
    try:
        return float(v) if v not in (None, "") else None
    except ValueError:
        return None


def job_progress(r, keys: Keys, job: str) -> dict:
    """A job's counters (see the module's docstring) with ``state``, ``status`` (in words),
    ``name``, ``job`` (its id), ``priority``, ``created`` and ``finished`` (epoch seconds;
    ``finished`` None while it runs)."""
    raw = _pairs(r.execute("HGETALL", keys.job(job)))
    out = {c: max(0, int(raw.get(c, 0) or 0)) for c in _COUNTERS}
    out.update(state=raw.get("state", "unknown"), name=raw.get("name", job), job=job,
               priority=int(raw.get("priority", 0) or 0), created=_float(raw.get("created")),
               finished=_float(raw.get("finished")))
    out["status"] = job_status(out)
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
        info["tasks_done"] = int(h.get("tasks_done", 0) or 0)  # (live: see the complete script)
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
        from miniray.broker import Broker, connect
        from miniray.config import settings

        s = settings()
        url = url or s.redis_url
        if url is None:
            from miniray.cluster.local import get_local_cluster

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

    def status(self) -> str:
        """The workers and jobs as ``miniray status`` prints them (``format_status``)."""
        return format_status(self.workers(), self.jobs())

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
