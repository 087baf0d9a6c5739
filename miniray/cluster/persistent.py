"""The persistent local cluster: a per-user background service that outlives the kernel.

``start()`` (``miniray.init(persist=True)``, ``miniray up --detach``, ``%miniray local
--persist``) launches ``python -m miniray.cluster.service --serve`` (that module is the
service) in a session of its own, with no
parent-death tie to the caller. That service runs a ``LocalCluster`` (a private server on a
unix socket with a random password, and worker processes, which die with the service even if it
is SIGKILLed) and, once the server accepts connections, writes the well-known per-user file
``<cluster dir>/cluster.json`` (mode 0600, in a 0700 directory, written atomically), which
holds the URL (with its password), the service's pid and start time, and its worker count.
Any process of the user finds it there (``find()``); ``stop()`` ends it, and it ends itself
after ``MINIRAY_IDLE_STOP_SECONDS`` without work (``miniray.cluster.service.busy_reasons``
decides what "work" is).

::

    caller ── start() ──flock(lock)── find()? ──no──> Popen(--serve, new session)
                                                         │ LocalCluster(server, workers)
    caller <── cluster.json (url, pid, started) <────────┘ write once the server answers
    find(): file + pid is our service + authenticated PING; a dead service's file is removed

The cluster directory is ``MINIRAY_CLUSTER_DIR``, else ``$XDG_RUNTIME_DIR/miniray``, else
``~/.miniray``. The server's own socket lives in a scratch directory (``miniray.scratch``),
short enough for the 107-byte unix socket limit; the file only points to it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass

from miniray.config import settings
from miniray.errors import ConfigurationError, MinirayError, ServerError

__all__ = ["PersistentCluster", "start", "find", "stop", "cluster_dir", "cluster_file"]

_FILE = "cluster.json"
_LOCK = "lock"
_LOG = "service.log"
_spawned: list = []  # Popen of services this process started (reaped, never waited on)


@dataclass(frozen=True)
class PersistentCluster:
    """What the cluster file says about a running persistent cluster. ``url`` holds the
    password: never print it (``repr`` leaves it out)."""

    url: str
    pid: int  # the service
    server_pid: int
    started: float  # epoch seconds
    workers: int
    idle_stop_seconds: float  # 0: never stops for idleness
    path: str  # the cluster file
    log_path: str

    @property
    def nworkers(self) -> int:  # as LocalCluster's
        return self.workers

    def alive(self) -> bool:
        """The service is running (cheap: no round trip to the server)."""
        return _is_service(self.pid)

    server_alive = alive  # (the Executor asks a local cluster this after a lost connection)

    def __repr__(self) -> str:
        return (f"<miniray.PersistentCluster pid={self.pid} workers={self.workers} "
                f"started={time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started))} "
                f"file={self.path}>")


# -- where ---------------------------------------------------------------------------------------
def cluster_dir(create: bool = False) -> str:
    """The directory of the cluster file (made 0700 when ``create``)."""
    d = settings().cluster_dir
    if not d:
        runtime = os.environ.get("XDG_RUNTIME_DIR")
        d = (os.path.join(runtime, "miniray") if runtime and os.path.isdir(runtime)
             else os.path.join(os.path.expanduser("~"), ".miniray"))
    d = os.path.abspath(d)
    if create:
        try:
            os.makedirs(d, mode=0o700, exist_ok=True)
        except OSError as e:
            raise ConfigurationError(
                f"cannot create the persistent cluster's directory {d}: {e}; set "
                "MINIRAY_CLUSTER_DIR to a directory you can write") from None
        st = os.stat(d)
        if st.st_uid != os.getuid():
            raise ConfigurationError(
                f"{d} belongs to another user (uid {st.st_uid}): it cannot hold this user's "
                "cluster file; set MINIRAY_CLUSTER_DIR to a directory of your own")
        if stat.S_IMODE(st.st_mode) & 0o077:
            os.chmod(d, 0o700)  # the file in it holds a password
    return d


def cluster_file() -> str:
    """The well-known per-user file of the persistent cluster (it may not exist)."""
    return os.path.join(cluster_dir(), _FILE)


# -- the service's identity ----------------------------------------------------------------------
def _proc_alive(pid: int) -> bool:
    """``pid`` runs (a zombie does not count: its parent has not reaped it yet)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rsplit(b")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def _cmdline(pid: int) -> list[bytes]:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().split(b"\0")
    except OSError:
        return []


def _is_service(pid: int) -> bool:
    """``pid`` is a running persistent-cluster service of this user (not a recycled pid)."""
    if not isinstance(pid, int) or pid <= 0 or not _proc_alive(pid):
        return False
    try:
        if os.stat(f"/proc/{pid}").st_uid != os.getuid():
            return False
    except OSError:
        return False
    argv = _cmdline(pid)
    return b"miniray.cluster.service" in argv and b"--serve" in argv


def _members(pid: int) -> list[int]:
    """Worker processes a service ``pid`` started (they carry ``--parent-pid PID``)."""
    found, want = [], str(pid).encode()
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        argv = _cmdline(int(name))
        if b"miniray.worker" in argv and b"--parent-pid" in argv:
            i = argv.index(b"--parent-pid")
            if argv[i + 1:i + 2] == [want] and _proc_alive(int(name)):
                found.append(int(name))
    return found


def _answers(url: str, timeout: float = 3.0) -> bool:
    """The server at ``url`` (a unix socket) answers an authenticated PING within
    ``timeout`` seconds (a bounded check: a stopped server makes it False, not a hang)."""
    from miniray.resp import parse_url

    try:
        p = parse_url(url)
    except ValueError:
        return False
    if "unix" not in p:
        return False
    pw = (p.get("password") or "").encode()
    msg = b"*1\r\n$4\r\nPING\r\n"
    if pw:
        msg = b"*2\r\n$4\r\nAUTH\r\n$%d\r\n%s\r\n" % (len(pw), pw) + msg
    deadline = time.monotonic() + timeout
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(p["unix"])
            s.sendall(msg)
            got = b""
            while b"PONG" not in got and not got.startswith(b"-") and b"\r\n-" not in got:
                s.settimeout(max(0.01, deadline - time.monotonic()))
                chunk = s.recv(256)
                if not chunk:
                    return False
                got += chunk
            return b"PONG" in got
    except OSError:
        return False


# -- the file ------------------------------------------------------------------------------------
def _read(path: str) -> PersistentCluster | None:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise ConfigurationError(f"cannot read the persistent cluster file {path}: {e}") from None
    with os.fdopen(fd, "rb") as f:
        st = os.fstat(f.fileno())
        if st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) & 0o077:
            # someone else could have pointed us to their server: refuse it
            raise ConfigurationError(
                f"{path} is not private to you (owner uid {st.st_uid}, mode "
                f"{stat.S_IMODE(st.st_mode):o}); remove it (a persistent cluster writes it "
                "with mode 0600)")
        raw = f.read()
    try:
        d = json.loads(raw)
        return PersistentCluster(url=str(d["url"]), pid=int(d["pid"]),
                                 server_pid=int(d["server_pid"]), started=float(d["started"]),
                                 workers=int(d["workers"]),
                                 idle_stop_seconds=float(d["idle_stop_seconds"]),
                                 path=path, log_path=str(d.get("log", "")))
    except (ValueError, KeyError, TypeError):
        return PersistentCluster(url="", pid=0, server_pid=0, started=0.0, workers=0,
                                 idle_stop_seconds=0.0, path=path, log_path="")  # unreadable: stale


def _write(path: str, data: dict) -> None:
    """Atomically: the file appears whole, mode 0600, or not at all."""
    tmp = f"{path}.{os.getpid()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(data, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _remove_if(path: str, pid: int) -> None:
    """Remove the file if it still names service ``pid`` (not a newer service's file)."""
    try:
        info = _read(path)
    except ConfigurationError:
        return
    if info is not None and info.pid == pid:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


@contextlib.contextmanager
def _locked(d: str, timeout: float, blocking: bool = True):
    """Hold the directory's lock (flock: released if the holder dies), waiting at most
    ``timeout`` seconds; yields False instead of waiting when not ``blocking``."""
    fd = os.open(os.path.join(d, _LOCK), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if not blocking:
                    yield False
                    return
                if time.monotonic() > deadline:
                    raise MinirayError(
                        f"another process has held {os.path.join(d, _LOCK)} for {timeout:.0f} s "
                        "(starting or stopping the persistent cluster); try again, or see "
                        f"{os.path.join(d, _LOG)}") from None
                time.sleep(0.05)
        yield True
    finally:
        os.close(fd)


def _reap() -> None:
    for p in list(_spawned):
        if p.poll() is not None:
            _spawned.remove(p)


# -- the API -------------------------------------------------------------------------------------
def _lookup() -> tuple[PersistentCluster | None, str]:
    """(info, "running" | "stale" | "unresponsive" | "none")."""
    _reap()
    info = _read(os.path.join(cluster_dir(), _FILE))
    if info is None:
        return None, "none"
    if not _is_service(info.pid):
        return info, "stale"
    if not _answers(info.url):
        return info, "unresponsive"
    return info, "running"


def find() -> PersistentCluster | None:
    """The running persistent cluster of this user, or None. A file left by a service that
    died (SIGKILL, a reboot) is removed."""
    info, state = _lookup()
    if state == "stale":
        d = cluster_dir()
        with _locked(d, 0, blocking=False) as got:
            if got:  # (else a start or stop holds it and deals with the file)
                _remove_if(info.path, info.pid)
    return info if state == "running" else None


def start(workers: int | None = None, idle_seconds: float | None = None,
          timeout: float = 60.0) -> PersistentCluster:
    """Start the persistent cluster, or return the running one (whatever its size).

    ``workers``: worker processes (default ``MINIRAY_LOCAL_WORKERS``, else one per core);
    ``idle_seconds``: stop after this long without work (default
    ``MINIRAY_IDLE_STOP_SECONDS``; 0: never). Two processes starting at once get one cluster.

    >>> info = miniray.persistent.start(workers=4)        # doctest: +SKIP
    >>> miniray.Executor(redis_url=info.url)               # doctest: +SKIP
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ConfigurationError(f"workers={workers!r}: a persistent cluster needs at least "
                                 "one worker")
    idle = settings().idle_stop_seconds if idle_seconds is None else idle_seconds
    if not isinstance(idle, (int, float)) or isinstance(idle, bool) or idle < 0:
        raise ConfigurationError(f"idle stop {idle!r}: give a number of seconds >= 0 "
                                 "(0: never stop for idleness)")
    d = cluster_dir(create=True)
    with _locked(d, timeout):
        info, state = _lookup()
        if state == "running":
            return info
        if state == "unresponsive":
            raise ServerError(
                f"the persistent cluster (service pid {info.pid}) runs but its server does not "
                f"answer; `miniray down` stops it (its log: {info.log_path})")
        if state == "stale":
            _remove_if(info.path, info.pid)
        env = dict(os.environ)
        env.pop("MINIRAY_REDIS_URL", None)  # its workers use its own server
        env["MINIRAY_CLUSTER_DIR"] = d
        cmd = [sys.executable, "-m", "miniray.cluster.service", "--serve", "--idle-stop",
               str(idle)]
        if workers is not None:
            cmd += ["--workers", str(workers)]
        log_path = os.path.join(d, _LOG)
        with open(log_path, "ab") as log:
            os.chmod(log_path, 0o600)
            proc = subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                    stderr=log, close_fds=True,
                                    # not tied to the caller: no parent-death signal, no
                                    # process group a kernel's interrupt or shutdown reaches
                                    start_new_session=True)
        _spawned.append(proc)
        deadline = time.monotonic() + timeout
        path = os.path.join(d, _FILE)
        while time.monotonic() < deadline:
            rc = proc.poll()
            if rc is not None:
                raise ServerError(f"the persistent cluster service exited with status {rc} "
                                  f"while starting: {_tail(log_path)}")
            info = _read(path)
            if info is not None and info.pid == proc.pid and _answers(info.url):
                return info
            time.sleep(0.05)
        proc.kill()
        raise ServerError(f"the persistent cluster did not start within {timeout:.0f} s: "
                          f"{_tail(log_path)}")


def stop(timeout: float = 10.0) -> bool:
    """Stop the persistent cluster: its service, server, workers and their task processes;
    remove its file. True if one was running. Bounded: SIGTERM, then SIGKILL after
    ``timeout`` seconds."""
    d = cluster_dir()
    if not os.path.isdir(d):
        return False
    with _locked(d, timeout + 10):
        info = _read(os.path.join(d, _FILE))
        if info is None:
            _reap()
            return False
        running = _is_service(info.pid)
        members = _members(info.pid) if running else []
        if running:
            os.kill(info.pid, signal.SIGTERM)
            if not _wait_gone([info.pid], timeout):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(info.pid, signal.SIGKILL)
                _wait_gone([info.pid], 5.0)
        # server and workers die with the service (parent-death signal); wait, bounded
        rest = [p for p in members + [info.server_pid] if p > 0]
        if not _wait_gone(rest, 10.0):
            for p in rest:
                if _proc_alive(p) and b"miniray.worker" in _cmdline(p):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(p, signal.SIGKILL)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(info.path)
        _reap()
        return running


def _wait_gone(pids: list[int], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        _reap()
        if not any(_proc_alive(p) for p in pids):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


def _tail(path: str, n: int = 600) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - n))
            return f.read().decode(errors="replace").strip() or "(its log is empty)"
    except OSError:
        return "(no log)"
