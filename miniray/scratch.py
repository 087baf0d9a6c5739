"""Private scratch directories, named for the process that owns them.

The embedded server's directory (its socket, config and logs) and an executor's inbox live in
``<tmp>/miniray-<kind>-<pid namespace>-<pid>-<random>`` (mode 0700). A process that exits
normally removes its own; one that is killed (SIGKILL, a notebook kernel restart) cannot, so
the first directory a later miniray process makes sweeps away those of this user whose
process is gone (same pid namespace only: a pid from another one says nothing here).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
import tempfile
import threading

__all__ = ["private_dir", "sweep", "remove_dead"]

_NAME = re.compile(r"miniray-(?:server|inbox)-(\d+)-(\d+)-[^/]+$")
_swept = False
_lock = threading.Lock()


def _pid_namespace() -> str:
    try:
        return os.readlink("/proc/self/ns/pid").rsplit("[", 1)[-1].rstrip("]")
    except OSError:
        return "0"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's: alive
        return True
    return True


def private_dir(kind: str) -> str:
    """A new directory only this user can enter, for ``kind`` ("server" or "inbox")."""
    sweep()
    return tempfile.mkdtemp(prefix=f"miniray-{kind}-{_pid_namespace()}-{os.getpid()}-")


def sweep() -> None:
    """Remove what killed miniray processes of this user left (once per process)."""
    global _swept
    with _lock:
        if _swept:
            return
        _swept = True
    remove_dead(tempfile.gettempdir(), _NAME)


def remove_dead(root: str, name: "re.Pattern") -> int:
    """Remove the directories in ``root`` whose names match ``name`` (groups: pid namespace,
    pid), are this user's, and whose process is gone (same pid namespace only); return how
    many. One listing of ``root`` (``miniray.values.shm`` sweeps ``/dev/shm`` with it too)."""
    ns, uid, n = _pid_namespace(), os.getuid(), 0
    try:
        names = os.listdir(root)
    except OSError:
        return 0
    for entry in names:
        m = name.match(entry)
        if m is None or m.group(1) != ns or _alive(int(m.group(2))):
            continue
        path = os.path.join(root, entry)
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid:
            shutil.rmtree(path, ignore_errors=True)
            n += 1
    return n
