"""The CPU and memory a worker itself uses: its own process, its task processes and theirs.

A heartbeat reports the machine's totals (``cpu_percent``, ``ram_used``) and, from here, the
worker's own share (``proc_cpu_percent``, 100 = one core busy; ``proc_rss``, bytes), so that a
lane per worker shows that worker, not the machine once per lane. Cheap enough for every
heartbeat: ``psutil.Process`` objects are kept between samples (``cpu_percent(None)``
measures since the previous call on the same object) and dropped when their process ends.
"""

from __future__ import annotations

import os

import psutil

__all__ = ["ProcessUsage"]


class ProcessUsage:
    """Samples the CPU and resident memory of one process tree (this process by default)."""

    def __init__(self, root: int | None = None):
        self._root = psutil.Process(root or os.getpid())
        self._procs: dict[int, psutil.Process] = {}

    def sample(self) -> tuple[float, int]:
        """``(cpu percent, rss bytes)`` summed over the root and its descendants. The first
        sample of a process counts no CPU (there is nothing to compare with yet)."""
        seen: dict[int, psutil.Process] = {self._root.pid: self._root}
        try:
            for child in self._root.children(recursive=True):
                seen[child.pid] = self._procs.get(child.pid, child)
        except psutil.Error:
            pass
        cpu, rss = 0.0, 0
        for pid, p in seen.items():
            try:
                with p.oneshot():
                    cpu += p.cpu_percent(None)
                    rss += p.memory_info().rss
            except psutil.Error:
                seen[pid] = None
        self._procs = {pid: p for pid, p in seen.items() if p is not None}
        return cpu, rss
