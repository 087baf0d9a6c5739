"""``RemoteWorker``: the client end of a WorkerServer connection, with the API of ``Worker``."""

import socket
import time

from miniray.errors import WorkerDiedError

from .framing import DATA, DEFAULT_MAX_SIZE, Channel, get_codec
from .handshake import client_handshake


class RemoteWorker(Channel):
    """Connect to a ``WorkerServer`` and talk to the worker it forks for this connection.

    >>> w = RemoteWorker("gpu1", 7077, secret=secret, codec="pickle")  # doctest: +SKIP
    >>> w.send(batch); w.recv(timeout=30)                              # doctest: +SKIP

    ``env`` is applied in the remote worker before ``work_fn`` runs (e.g. CUDA_VISIBLE_DEVICES).
    Closing or killing the connection kills the remote worker. ``pid`` is the remote pid.
    """

    def __init__(self, host, port, *, secret=None, codec="json", max_size=DEFAULT_MAX_SIZE,
                 timeout=10.0, env=None):
        get_codec(codec)
        self.host, self.port = host, int(port)
        address = f"{host}:{port}"
        try:
            sock = socket.create_connection((host, self.port), timeout=timeout)
        except OSError as e:
            raise ConnectionError(f"cannot connect to WorkerServer at {address}: {e}; is "
                                  "`miniray serve` running there and the port open?") from e
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keepalive(sock)
        try:
            self.pid = client_handshake(sock, address, secret, codec, max_size, env)
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        super().__init__(sock, codec=codec, max_size=max_size)
        self._exitcode = None

    def __repr__(self):
        state = "alive" if self.is_alive() else "closed"
        return f"<RemoteWorker {self.host}:{self.port} pid={self.pid} codec={self.codec} {state}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def exitcode(self):
        """None while connected; -1 once the connection is gone (the remote status is unknown)."""
        return None if self.is_alive() else -1

    def is_alive(self):
        """True while the connection is open (checked without blocking or consuming data)."""
        if self._closed:
            return False
        try:
            data = self._sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except OSError:
            data = b""
        if not data:
            self._close_socket()  # EOF is final: release the socket now
        return bool(data)

    def wait(self, timeout=None):
        """Wait until the remote worker closes the connection; messages sent before stay queued."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._recv_lock:
            while self.is_alive():
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    raise TimeoutError(f"remote worker {self.host}:{self.port} still running")
                if not self._readable(remaining):
                    continue
                try:
                    kind, payload = self._recv_frame(None)
                except WorkerDiedError:
                    break
                if kind == DATA:
                    self._pending.append(payload)
        return self.exitcode

    def kill(self):
        """Drop the connection; the server then SIGKILLs the remote worker."""
        self.close()

    def _closed_error(self, detail):
        return WorkerDiedError(
            f"remote worker pid {self.pid} at {self.host}:{self.port} is gone ({detail})",
            exitcode=None)


def _keepalive(sock, idle=30, interval=10, probes=3):
    """Notice a vanished host in about a minute instead of the kernel's default two hours."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", interval),
                        ("TCP_KEEPCNT", probes)):
        if hasattr(socket, name):  # Linux names; macOS has only some of them
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)
