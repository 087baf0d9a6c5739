"""Which cluster this kernel's maps and ``%miniray`` commands go to, resolved at each use.

A kernel that chose nothing (no ``%miniray local``, ``connect`` or ``up``) uses
``MINIRAY_REDIS_URL`` when set, else the user's persistent local cluster when one runs, else
its own embedded cluster: nothing lingers unless the user asked for it, and once asked, every
kernel of the user finds it. ``%miniray local --persist`` makes this kernel use the persistent
cluster, started again when it has stopped for idleness.
"""

from __future__ import annotations

import time

import miniray
from miniray.cluster import persistent
from miniray.cluster.local import get_local_cluster
from miniray.resp import redact

__all__ = ["ClusterTarget", "start_persistent", "stop_persistent"]

_CHOICES = ("default", "embedded", "persist", "url")


def _clock(t: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(t))


class ClusterTarget:
    """This kernel's choice of cluster; ``url()`` resolves it now (None: the embedded one)."""

    def __init__(self):
        self.choice = "default"
        self._url: str | None = None
        self._workers: int | None = None
        self._seen = None  # (kind, url) resolved last, and since when
        self.since: float | None = None

    def choose(self, choice: str, url: str | None = None, workers: int | None = None) -> None:
        assert choice in _CHOICES
        self.choice, self._url, self._workers = choice, url, workers
        self._seen = self.since = None

    def _resolve(self, start: bool = True) -> tuple[str, str | None, object]:
        """(kind, url or None, the PersistentCluster when that is it)."""
        if self.choice == "url":
            return "url", self._url, None
        if self.choice == "embedded":
            return "embedded", None, None
        if self.choice == "persist":
            info = (persistent.start(workers=self._workers) if start else persistent.find())
            return ("persistent", info.url, info) if info else ("embedded", None, None)
        from miniray.config import settings

        env = settings().redis_url
        if env:
            return "env", env, None
        info = persistent.find()
        if info is not None:
            return "persistent", info.url, info
        return "embedded", None, None

    def url(self, start: bool = True) -> str | None:
        """The URL to use now (None: this kernel's embedded cluster); with ``start`` and
        ``--persist``, the persistent cluster is started again if it stopped."""
        kind, url, info = self._resolve(start)
        key = (kind, url, info.pid if info else None)
        if key != self._seen:
            self._seen, self.since = key, time.time()
        return url

    def kind(self) -> str:
        """"persistent", "embedded", "env" or "url", without starting anything."""
        return self._resolve(start=False)[0]

    def describe(self, ssh_hosts: list | None = None) -> str:
        """One line: which cluster this kernel is connected to, and since when."""
        start = self.choice == "persist"  # (as its next map would: started again)
        kind, url, info = self._resolve(start)
        self.url(start)
        since = f"since {_clock(self.since)}" if self.since else ""
        if ssh_hosts:
            return f"connected to the SSH cluster on {', '.join(ssh_hosts)} {since}"
        if kind == "persistent":
            idle = ("never stops for idleness" if not info.idle_stop_seconds
                    else f"stops after {info.idle_stop_seconds:g} s idle")
            return (f"connected to the persistent local cluster {since} (service pid {info.pid}, "
                    f"{info.workers} worker(s), started {_clock(info.started)}, {idle}; "
                    f"file {info.path})")
        if kind == "embedded":
            cluster = get_local_cluster()  # (the status that follows starts it in any case)
            return (f"connected to this kernel's embedded cluster since "
                    f"{_clock(cluster.started)} ({cluster.nworkers} worker(s); it stops with "
                    "the kernel)")
        if kind == "env":
            return f"connected to MINIRAY_REDIS_URL={redact(url)} {since}"
        return f"connected to {redact(url)} {since}"


def start_persistent(magics, workers: int | None) -> None:
    """``%miniray local --persist [-n N]``: start or reuse the persistent cluster and use it."""
    before = persistent.find()
    info = miniray.init(persist=True, workers=workers)  # (plain Executor() here uses it too)
    magics.target.choose("persist", workers=workers)
    magics.target.url(start=False)
    idle = ("it never stops for idleness" if not info.idle_stop_seconds
            else f"it stops after {info.idle_stop_seconds:g} s without work")
    print(f"miniray: {'reusing the' if before else 'started the'} persistent local cluster "
          f"(service pid {info.pid}, {info.workers} worker(s), started {_clock(info.started)}); "
          f"every kernel of yours finds it; {idle}; %miniray down stops it")


def stop_persistent(magics) -> None:
    """``%miniray down`` of a kernel that uses the persistent cluster (its maps are already
    cancelled): stop the cluster, and go back to the default."""
    info = persistent.find()
    stopped = persistent.stop()
    miniray.shutdown()  # forgets init(persist=True); stops an embedded cluster started before
    magics.target.choose("default")
    if stopped:
        what = f" (service pid {info.pid}, {info.workers} worker(s))" if info else ""
        print(f"miniray: persistent local cluster stopped{what}")
    else:
        print("miniray: the persistent local cluster was not running (it may have stopped "
              "for idleness)")
