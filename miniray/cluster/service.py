"""The persistent cluster's service process: it runs a ``LocalCluster``, writes the cluster
file, and stops itself after ``MINIRAY_IDLE_STOP_SECONDS`` without work.

``busy_reasons`` is the one place that decides what "work" is; the service asks it every few
seconds (a third of the idle setting, at most 5 s). Started by ``miniray.persistent.start()``
as ``python -m miniray.cluster.service --serve``; SIGTERM (``stop()``) ends it cleanly.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time

from miniray.config import settings

from .persistent import _FILE, _LOG, _locked, _remove_if, _write, cluster_dir

__all__ = ["busy_reasons"]


# -- what counts as work -------------------------------------------------------------------------
def busy_reasons(r, keys, seen: dict | None = None) -> list[str]:
    """Why the cluster behind connection ``r`` is busy now (empty: idle).

    The one place that decides it (the idle stop asks every few seconds): an open or closing
    job, a kept job's stored results that nobody has collected yet (see ``miniray.client.keep``;
    its owner's collection lets them expire, an attacher that got them all marks the job
    ``collected``), a task a worker holds (``wip:{worker}``), or a live executor: one whose
    ``client:{client}`` key was renewed since the last call (an executor renews it every
    second): its PTTL is above what it would be had it only run down since (``seen`` keeps
    each key's PTTL and when it was read, between calls; a key seen for the first time counts
    as renewed). ``jobs:all`` holds the newest 1000 jobs, which bounds the work here.
    """
    reasons = []
    jobs = [j.decode() if isinstance(j, bytes) else j
            for j in r.execute("ZRANGE", keys.jobs_all, 0, -1)]
    if jobs:
        pipe = r.pipeline()
        for j in jobs:
            pipe.command("HMGET", keys.job(j), "state", "keep", "collected")
            pipe.command("EXISTS", keys.out(j))
        replies = pipe.execute()
        for j, (state, keep, collected), stored in zip(jobs, replies[::2], replies[1::2]):
            state = state.decode() if isinstance(state, bytes) else state
            if state in ("open", "closing"):
                reasons.append(f"job {j} is {state}")
            elif keep and stored and not collected:
                # a kept job's results wait for someone to attach (miniray.attach) until its
                # owner or an attacher has collected them, or its keep grace ends
                reasons.append(f"kept job {j} has results nobody has collected")
    workers = [w.decode() if isinstance(w, bytes) else w
               for w in r.execute("ZRANGE", keys.workers, 0, -1)]
    if workers:
        pipe = r.pipeline()
        for w in workers:
            pipe.command("HLEN", keys.wip(w))
        for w, n in zip(workers, pipe.execute()):
            if n:
                reasons.append(f"worker {w} holds {n} chunk(s)")
    if seen is not None:
        clients, cursor = [], b"0"
        for _ in range(1000):  # bounded: SCAN visits every key once per pass
            cursor, batch = r.execute("SCAN", cursor, "MATCH", keys.client("*"), "COUNT", 1000)
            clients += batch
            if cursor in (b"0", "0", 0):
                break
        now, t = {}, time.monotonic()
        if clients:
            pipe = r.pipeline()
            for c in clients:
                pipe.command("PTTL", c)
            for c, ttl in zip(clients, pipe.execute()):
                c = c.decode() if isinstance(c, bytes) else c
                if ttl is None or ttl < 0:
                    continue
                now[c] = (ttl, t)
                before = seen.get(c)
                # 50 ms: what the two clocks' rounding can add; a renewal adds up to the grace
                if before is None or ttl > before[0] - (t - before[1]) * 1000 + 50:
                    reasons.append(f"executor {c.rsplit(':', 1)[-1]} is alive")
        seen.clear()
        seen.update(now)
    return reasons


# -- the service ---------------------------------------------------------------------------------
def _serve(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m miniray.cluster.service --serve")
    p.add_argument("--serve", action="store_true")
    p.add_argument("--workers", type=int, default=None)
    p.add_argument("--idle-stop", type=float, default=None)
    args = p.parse_args(argv)
    from miniray.broker import connect
    from miniray.keys import Keys

    from .local import LocalCluster

    s = settings()
    idle = s.idle_stop_seconds if args.idle_stop is None else args.idle_stop
    d = cluster_dir(create=True)
    path = os.path.join(d, _FILE)
    stopping = threading.Event()

    def on_signal(signum, frame):  # only a flag: the main loop stops
        stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, on_signal)
    cluster = LocalCluster(args.workers)
    try:
        _write(path, {"url": cluster.url, "pid": os.getpid(),
                      "server_pid": cluster.server.proc.pid,
                      "started": time.time(), "workers": cluster.nworkers,
                      "idle_stop_seconds": idle, "log": os.path.join(d, _LOG)})
        _say(f"started: service pid {os.getpid()}, {cluster.nworkers} worker(s), server "
             f"socket {cluster.server.socket_path}, idle stop "
             f"{'never' if not idle else f'after {idle:g} s'}")
        r = connect(cluster.url)
        keys = Keys(s.namespace)
        seen: dict = {}
        interval = min(5.0, max(0.2, idle / 3)) if idle else 5.0
        last_busy = time.monotonic()
        while not stopping.wait(interval):
            if not cluster.server_alive():
                _say("the server exited; stopping")
                break
            try:
                busy = busy_reasons(r, keys, seen)
            except Exception as e:  # a server restarting: ask again next time
                busy = [f"cannot ask the server ({type(e).__name__}: {e})"]
            if busy:
                last_busy = time.monotonic()
            elif idle and time.monotonic() - last_busy >= idle:
                if _withdraw_if_idle(d, path, r, keys, seen):
                    _say(f"idle for {idle:g} s (no jobs, no running tasks, no executors); "
                         "stopping")
                    break
                last_busy = time.monotonic()
        else:
            _say("asked to stop")
    finally:
        _remove_if(path, os.getpid())  # first: nobody finds a cluster that is going away
        cluster.close()
        _say("stopped")
    return 0


def _withdraw_if_idle(d: str, path: str, r, keys, seen: dict) -> bool:
    """Remove the cluster file if the cluster is still idle, holding the directory's lock: a
    ``start()`` waiting on it then starts a new cluster instead of joining one that stops,
    and an executor that joined in the meantime (its client key is new) keeps this one."""
    try:
        with _locked(d, 2.0):
            if busy_reasons(r, keys, seen):
                return False
            _remove_if(path, os.getpid())
            return True
    except Exception:  # the lock held by a start/stop, or the server busy: ask again later
        return False


def _say(text: str) -> None:
    print(f"{time.strftime('%Y-%m-%d %H:%M:%S')} miniray persistent cluster: {text}", flush=True)


if __name__ == "__main__":
    if "--serve" not in sys.argv[1:]:
        raise SystemExit("this module is the persistent cluster's service; start it with "
                         "`miniray up --detach` or miniray.init(persist=True)")
    sys.exit(_serve(sys.argv[1:]))
