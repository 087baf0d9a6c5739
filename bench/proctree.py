"""A process and its descendants, and the CPU each kind of miniray process has used (Linux
``/proc``): what ``w2_cpu.py``, ``w3_cpu.py`` and ``idle_slots.py`` measure with."""

import glob
import os


def tree(root: int) -> list:
    """``root`` and every process under it, from the parent pids in ``/proc/*/stat``."""
    kids: dict = {}
    for stat in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(stat) as f:
                text = f.read()
            pid, ppid = int(text.split()[0]), int(text.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue  # gone
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo += kids.get(pid, [])
    return out


def kind(pid: int) -> str:
    """client (this process), server, taskproc or worker."""
    if pid == os.getpid():
        return "client"
    with open(f"/proc/{pid}/comm") as f:
        if f.read().strip().endswith("-server"):
            return "server"  # valkey-server, redis-server
    with open(f"/proc/{pid}/cmdline") as f:
        argv = f.read().split("\0")
    return "taskproc" if argv[1:3] == ["-m", "miniray.worker.task"] else "worker"


def cpu_by_kind(pids) -> dict:
    """Per ``kind``, CPU seconds so far of ``pids`` (every thread, from ``schedstat``)."""
    out: dict = {}
    for pid in pids:
        try:
            k = kind(pid)
            ns = 0
            for path in glob.glob(f"/proc/{pid}/task/*/schedstat"):
                with open(path) as f:
                    ns += int(f.read().split()[0])
        except (OSError, ValueError, IndexError):
            continue  # gone
        out[k] = out.get(k, 0.0) + ns / 1e9
    return out
