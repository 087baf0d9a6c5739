"""The cluster's jobs with their owners: what ``miniray jobs`` and ``%miniray jobs`` show.

An owner (the executor that made a job) renews its ``client:{client}`` key every second with
its grace as TTL; a TTL more than ``ALIVE_SECONDS`` below that grace means it has not been
heard from lately (dead, or paused).
"""

from __future__ import annotations

import time

from miniray.keys import Keys

from . import observe
from .logview import describe

__all__ = ["ALIVE_SECONDS", "list_jobs", "format_jobs"]

ALIVE_SECONDS = 3  # an owner heard from within this many seconds is alive (it renews each second)


def list_jobs(r, keys: Keys, limit: int = 50) -> list[dict]:
    """``observe.list_jobs`` with ``kept`` (bool), ``owner`` (its client id) and
    ``owner_alive`` (bool) per job, newest first."""
    jobs = observe.list_jobs(r, keys, limit)
    if not jobs:
        return jobs
    meta = r.pipeline_raw([("HMGET", keys.job(j["job"]), "client", "keep", "grace")
                           for j in jobs])
    ttls = r.pipeline_raw([("TTL", keys.client(observe._d(m[0]) or "?")) for m in meta])
    for j, (client, keep, grace), ttl in zip(jobs, meta, ttls):
        grace = int(grace or 0)
        j["owner"] = observe._d(client)
        j["kept"] = bool(keep)
        j["owner_alive"] = (isinstance(ttl, int) and ttl > 0
                            and ttl >= grace - ALIVE_SECONDS)
    return jobs


def format_jobs(jobs: list, now: float | None = None) -> str:
    """The jobs as a table (id, name, state, done/failed/total, started, owner, kept)::

        jobs: 1
          JOB             NAME    STATE    PROGRESS      STARTED   OWNER  KEPT
          1a2b3c4d5e6f.0  'sq'    running  3/0/12        14:52:01  gone   yes
    """
    now = time.time() if now is None else now
    rows = []
    for j in jobs:
        status = describe(j)  # (in words: "failed 3 of 10")
        total = sum(j.get(c, 0) for c in ("queued", "running", "done", "failed", "cancelled"))
        name = repr(j["name"])
        rows.append([j["job"], name if len(name) <= 40 else name[:38] + "…" + name[0], status,
                     f"{j['done']}/{j['failed']}/{total}", observe._local_time(j.get("created"),
                                                                                now),
                     "alive" if j.get("owner_alive") else "gone",
                     "yes" if j.get("kept") else "no"])
    out = [f"jobs: {len(jobs)}"]
    if rows:
        out += observe._table(["JOB", "NAME", "STATE", "DONE/FAILED/TOTAL", "STARTED", "OWNER",
                               "KEPT"], rows)
        out.append("  (attach to a kept job: %miniray attach JOB -o VAR, or "
                   "miniray.attach(JOB))")
    return "\n".join(out)
