"""Results straight from a task process to its client on the same machine, past the server.

A client (``Executor``) opens an ``Inbox``: a unix datagram socket in a directory of its own
(mode 0700, so only its user, or root, can write to it). Its address, ``"<host id>:<path>"``,
travels in the job's spec. A task process on the same machine (same boot id) sends a small
result message there (``Sender.send``) and then reports the outcome to Redis as usual, minus
the message; anywhere else, or when the send fails (the client is gone, another mount
namespace, its queue is full, the message too big), the message goes through Redis as before.

Why: a lone task's result then reaches its client in one hop instead of two (through the
server), and the server does less per task. Nothing is lost if the sender dies between the
two steps: the chunk is still in ``wip``, so it runs again (at least once, as ever), and the
client keeps the first result it gets.
"""

from __future__ import annotations

import errno
import os
import shutil
import socket

from miniray.scratch import private_dir

__all__ = ["Inbox", "Sender", "host_id", "MAX_MESSAGE"]

MAX_MESSAGE = 64 * 1024  # bytes: bigger result messages go through Redis

_host_id: str | None = None


def host_id() -> str:
    """This machine's identity while it runs: the kernel's boot id (shared by containers on
    the host, which a send then tells apart by its path), else the host name."""
    global _host_id
    if _host_id is None:
        try:
            with open("/proc/sys/kernel/random/boot_id") as f:
                _host_id = f.read().strip()
        except OSError:
            _host_id = socket.gethostname()
    return _host_id


class Inbox:
    """The client's end: a datagram socket that result messages arrive on."""

    def __init__(self):
        self._dir = private_dir("inbox")  # 0700: only this user (or root) may send
        self.path = os.path.join(self._dir, "r")
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            self._sock.bind(self.path)
        except OSError:  # e.g. a TMPDIR too long for a socket path
            self.close()
            raise
        self._sock.setblocking(False)
        self._buf = bytearray(MAX_MESSAGE)
        self.address = f"{host_id()}:{self.path}"

    @classmethod
    def open(cls) -> "Inbox | None":
        """An inbox, or None where this platform or its temporary directory has none."""
        if not hasattr(socket, "AF_UNIX"):
            return None
        try:
            return cls()
        except OSError:
            return None

    def fileno(self) -> int:
        return self._sock.fileno()

    def drain(self) -> list:
        """The messages waiting, oldest first (none: an empty list); never blocks."""
        out, buf, sock = [], memoryview(self._buf), self._sock
        if sock is None:
            return out
        while True:
            try:
                n = sock.recv_into(buf)
            except (BlockingIOError, InterruptedError):
                return out
            out.append(bytes(buf[:n]))  # (one copy: a view's slice copies nothing)

    def remove(self) -> None:
        """Take the socket's name away (nothing more can arrive); it stays open."""
        shutil.rmtree(self._dir, ignore_errors=True)

    def close(self) -> None:
        sock, self._sock = getattr(self, "_sock", None), None
        if sock is not None:
            sock.close()
        self.remove()


class Sender:
    """The task process's end: sends a message to an inbox address if it can, never waits."""

    _GONE = (errno.ENOENT, errno.ECONNREFUSED, errno.EACCES, errno.EPERM, errno.ENOTDIR)

    def __init__(self):
        self._sock = None
        self._prefix = host_id() + ":"
        self._dead: set = set()  # inboxes that cannot be reached from here

    def send(self, address: str | None, msg: bytes) -> bool:
        """True if ``msg`` is now in the inbox at ``address`` (then its client gets it)."""
        if (not address or len(msg) > MAX_MESSAGE or not address.startswith(self._prefix)
                or address in self._dead):
            return False
        if self._sock is None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            self._sock.setblocking(False)
        try:
            self._sock.sendto(msg, address[len(self._prefix):])
            return True
        except OSError as e:  # full (EAGAIN): through Redis this time; gone: from now on
            if e.errno in self._GONE:
                if len(self._dead) > 1000:  # (clients come and go: a bound, not a ledger)
                    self._dead.clear()
                self._dead.add(address)
            return False
