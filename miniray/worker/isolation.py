"""Task isolation on Linux: memory cgroups (v1 or v2), RLIMIT_AS fallback, CPU pinning, kill-tree,
and killing what a task left running.

The worker creates one cgroup per task process; the task process joins it itself before it
runs anything (``join``), so no allocation escapes the limit. Where no memory cgroup can be
written (no controller, no permission, not Linux) the task process limits its address space
with RLIMIT_AS instead and the worker says so once.

A task process outlives its tasks (it is reused, warm), so a cgroup of its own cannot tell
what one task left behind from the process itself. Instead the task process is a child
subreaper (``become_subreaper``): whatever a task starts stays its descendant, even a daemon
that double-forks and calls setsid, and ``Leftovers`` kills and reaps those descendants
after each chunk (unless the job's ``Limits(keep_children=True)``).
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import threading
import time

__all__ = ["MemoryCgroup", "memory_cgroup_support", "pin_cpus", "kill_tree", "apply_rlimit_as",
           "become_subreaper", "Leftovers"]

log = logging.getLogger("miniray.isolation")
_SUPPORT: tuple | None = None


def _mounts():
    try:
        with open("/proc/self/mounts") as f:
            for line in f:
                parts = line.split()
                if len(parts) >= 4:
                    yield parts[1], parts[2], parts[3].split(",")
    except OSError:
        return


def _own_cgroup(controller: str | None) -> str | None:
    """This process's cgroup path for a v1 controller, or the v2 path when None."""
    try:
        with open("/proc/self/cgroup") as f:
            for line in f:
                _, ctrls, path = line.rstrip("\n").split(":", 2)
                if controller is None and ctrls == "":
                    return path
                if controller is not None and controller in ctrls.split(","):
                    return path
    except OSError:
        pass
    return None


def _writable_dir(path: str) -> bool:
    probe = os.path.join(path, f"miniray-probe-{os.getpid()}")
    try:
        os.mkdir(probe)
        os.rmdir(probe)
        return True
    except OSError:
        return False


def memory_cgroup_support() -> tuple:
    """``("v1", parent_dir)``, ``("v2", parent_dir)`` or ``(None, reason)``; cached."""
    global _SUPPORT
    if _SUPPORT is not None:
        return _SUPPORT
    reasons = []
    for mountpoint, fstype, opts in list(_mounts()):
        if fstype == "cgroup" and "memory" in opts:
            own = _own_cgroup("memory") or "/"
            parent = os.path.join(mountpoint, own.lstrip("/"))
            if _writable_dir(parent):
                _SUPPORT = ("v1", parent)
                return _SUPPORT
            reasons.append(f"cgroup v1 memory at {parent} is not writable")
    for mountpoint, fstype, _ in list(_mounts()):
        if fstype == "cgroup2":
            own = _own_cgroup(None) or "/"
            parent = os.path.join(mountpoint, own.lstrip("/"))
            try:
                with open(os.path.join(parent, "cgroup.subtree_control")) as f:
                    enabled = f.read().split()
            except OSError:
                enabled = []
            if "memory" in enabled and _writable_dir(parent):
                _SUPPORT = ("v2", parent)
                return _SUPPORT
            reasons.append(f"cgroup v2 at {parent} has no writable memory controller")
    _SUPPORT = (None, "; ".join(reasons) or "no cgroup filesystem is mounted")
    return _SUPPORT


class MemoryCgroup:
    """A memory-limited cgroup for one task process and everything it starts."""

    def __init__(self, version: str, path: str, limit_bytes: int):
        self.version, self.path, self.limit_bytes = version, path, limit_bytes
        self._oom_base = self.oom_kills()

    @classmethod
    def create(cls, name: str, limit_bytes: int) -> "MemoryCgroup | None":
        version, parent = memory_cgroup_support()
        if version is None:
            return None
        path = os.path.join(parent, f"miniray-{name}")
        try:
            os.makedirs(path, exist_ok=True)
            if version == "v1":
                _write(os.path.join(path, "memory.limit_in_bytes"), limit_bytes)
                _try_write(os.path.join(path, "memory.memsw.limit_in_bytes"), limit_bytes)
                _try_write(os.path.join(path, "memory.swappiness"), 0)
            else:
                _write(os.path.join(path, "memory.max"), limit_bytes)
                _try_write(os.path.join(path, "memory.swap.max"), 0)
        except OSError as e:
            log.warning("cannot set up memory cgroup %s: %s", path, e)
            _rmdir(path)
            return None
        return cls(version, path, limit_bytes)

    @staticmethod
    def join(path: str) -> None:
        """Move the calling process into the cgroup at ``path`` (run in the task process)."""
        _write(os.path.join(path, "cgroup.procs"), os.getpid())

    def oom_kills(self) -> int:
        name = "memory.oom_control" if self.version == "v1" else "memory.events"
        try:
            with open(os.path.join(self.path, name)) as f:
                for line in f:
                    key, _, value = line.partition(" ")
                    if key == "oom_kill":
                        return int(value)
        except (OSError, ValueError):
            pass
        if self.version == "v1":  # old kernels: no oom_kill counter; failcnt is the hint
            try:
                with open(os.path.join(self.path, "memory.failcnt")) as f:
                    return int(f.read().strip() or 0)
            except (OSError, ValueError):
                pass
        return 0

    def oom_killed(self) -> bool:
        """Whether the kernel OOM-killed something here since creation (or the last reset)."""
        return self.oom_kills() > self._oom_base

    def reset_oom(self) -> None:
        self._oom_base = self.oom_kills()

    def pids(self) -> list[int]:
        try:
            with open(os.path.join(self.path, "cgroup.procs")) as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def kill(self) -> None:
        if self.version == "v2" and _try_write(os.path.join(self.path, "cgroup.kill"), 1):
            return
        for pid in self.pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def remove(self) -> None:
        self.kill()
        _rmdir(self.path)


def apply_rlimit_as(limit_bytes: int) -> None:
    import resource

    resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))


def pin_cpus(cpus: list[int]) -> None:
    """Pin the calling process to ``cpus`` and tell threaded libraries how many they have."""
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, cpus)
    n = str(len(cpus))
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                "NUMEXPR_NUM_THREADS"):
        os.environ[var] = n


def kill_tree(pid: int, sig: int = signal.SIGKILL) -> None:
    """Signal a process, its process group (task processes lead their own) and descendants."""
    victims = []
    try:
        import psutil

        victims = psutil.Process(pid).children(recursive=True)
    except Exception:
        pass
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
    for p in [pid] + [v.pid for v in victims]:
        try:
            os.kill(p, sig)
        except (ProcessLookupError, PermissionError):
            pass


def become_subreaper() -> bool:
    """Have orphans among this process's descendants re-parent to it instead of to init
    (``PR_SET_CHILD_SUBREAPER``), so what a task leaves behind can still be found. Linux only."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0
    except Exception:
        return False


class Leftovers:
    """Kills the processes a task left running, once the chunk that started them returns.

    ``after_chunk`` is on the per-chunk path: finding nothing costs one system call (a
    ``waitid`` that reaps nothing, 2 us on a VM), so in a stream of short chunks it looks at
    most every ``CHECK_SECONDS`` and owes the look (``owed``) until then, or until the process
    goes idle (``settle``); a chunk that keeps its children looks at once, and first settles
    what earlier chunks owe (their leftovers are not its to keep). Left-behind processes get SIGKILL at once, parents and
    children alike: a SIGTERM grace would hold the slot or need a timer, and a task that
    wanted its helpers to end cleanly should have ended them. Then the dead are reaped, for
    up to ``REAP_SECONDS``; one that takes longer is reaped after a later chunk.
    Children of a job with ``keep_children`` are left alone (and what they start) until this
    process ends (``kill_all``) or they exit (then they are reaped here: they are ours)."""

    REAP_SECONDS = 1.0
    CHECK_SECONDS = 0.02

    def __init__(self):
        self.pid = os.getpid()
        self.kept: set[int] = set()
        self.owed = False  # a chunk returned since the last look
        self._looked = float("-inf")
        tid = threading.get_native_id()
        self._proc = os.path.exists(f"/proc/{self.pid}/task/{tid}/children")
        self._waitid = hasattr(os, "waitid")

    def any(self) -> bool:
        """Whether this process has any child, dead or alive (as a subreaper: any descendant)."""
        if not self._waitid:
            return bool(self.children(self.pid))
        try:  # WNOWAIT: a user's Popen still gets the status of the child it waits for
            os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            return True
        except ChildProcessError:
            return False

    def after_chunk(self, keep: bool = False) -> int:
        """Kill and reap what the chunk that just returned left running (now, or within
        ``CHECK_SECONDS``); how many were killed. With ``keep`` the children now alive are kept."""
        now = time.monotonic()
        if not keep and now - self._looked < self.CHECK_SECONDS:
            self.owed = True
            return 0
        return self.look(keep, now)

    def settle(self) -> int:
        """Pay a look owed (before a chunk that keeps its children; when idle, if due)."""
        return self.look(False, time.monotonic()) if self.owed else 0

    def due(self) -> bool:
        return self.owed and time.monotonic() - self._looked >= self.CHECK_SECONDS

    def look(self, keep: bool, now: float) -> int:
        self.owed, self._looked = False, now
        if not self.any():
            self.kept.clear()
            return 0
        children = set(self.children(self.pid))
        self.kept &= children  # a pid reaped meanwhile is no longer ours to keep
        if self.kept:
            self._reap({p for p in self.kept if _zombie(p)}, 0)
            self.kept &= set(self.children(self.pid))
        if keep:
            self.kept |= {p for p in children if not _zombie(p)}
            return 0
        return self._kill(self.kept)

    def kill_all(self) -> int:
        """Kill every descendant, kept ones too (this process is about to end)."""
        self.kept.clear()
        return self._kill(set()) if self.any() else 0

    def children(self, pid: int) -> list[int]:
        if not self._proc:
            try:
                import psutil

                return [c.pid for c in psutil.Process(pid).children()]
            except Exception:
                return []
        try:
            tids = os.listdir(f"/proc/{pid}/task")
        except OSError:
            return []
        found = []
        for tid in tids:  # a child belongs to the thread that forked it
            try:
                with open(f"/proc/{pid}/task/{tid}/children", "rb") as f:
                    found.extend(map(int, f.read().split()))
            except (OSError, ValueError):
                pass
        return found

    def _kill(self, spare: set) -> int:
        doomed: set[int] = set()
        for _ in range(5):  # what a dying parent forked meanwhile re-parents here: next round
            victims, stack = [], [p for p in self.children(self.pid) if p not in spare]
            while stack:
                p = stack.pop()
                victims.append(p)
                stack.extend(self.children(p))
            if not victims or doomed.issuperset(victims):
                break
            for p in victims:
                try:
                    os.kill(p, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            doomed.update(victims)
        self._reap(set(doomed), self.REAP_SECONDS)
        return len(doomed)

    @staticmethod
    def _reap(pids: set, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while pids:
            for p in list(pids):
                try:
                    if os.waitpid(p, os.WNOHANG)[0]:
                        pids.discard(p)
                except ChildProcessError:  # a grandchild whose parent reaped it, or not yet ours
                    if not os.path.exists(f"/proc/{p}"):
                        pids.discard(p)
            if not pids or time.monotonic() >= deadline:
                return
            time.sleep(0.002)


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rpartition(b")")[2].split()[0] == b"Z"
    except (OSError, IndexError):
        return False


def _write(path: str, value) -> None:
    with open(path, "w") as f:
        f.write(str(value))


def _try_write(path: str, value) -> bool:
    try:
        _write(path, value)
        return True
    except OSError:
        return False


def _rmdir(path: str) -> None:
    for _ in range(50):
        try:
            os.rmdir(path)
            return
        except FileNotFoundError:
            return
        except OSError:
            import time

            time.sleep(0.01)
