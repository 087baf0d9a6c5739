"""Length-prefixed frames over a stream socket, the codecs that fill them, and ``Channel``.

Wire format (protocol version ``PROTOCOL_VERSION``): every frame is a 9-byte header
``!BQ`` = (kind, payload length) followed by the payload. ``DATA`` frames carry one encoded
message; ``PING``/``PONG`` frames carry an opaque token and never reach user code. A frame is
checked against ``max_size`` before it is written and before its payload is read, so a stray or
hostile peer cannot make us allocate gigabytes from a forged length.
"""

import itertools
import json
import marshal
import os
import pickle
import select
import selectors
import socket
import struct
import threading
import time
from collections import deque

import cloudpickle

from miniray.errors import ChannelClosedError, FrameTooLargeError, ProtocolError

PROTOCOL_VERSION = 1
DEFAULT_MAX_SIZE = 256 * 1024 * 1024
DATA, PING, PONG = 0, 1, 2
_HEADER = struct.Struct("!BQ")
# Below this size one concatenated sendall beats two syscalls; above it, the copy costs more.
_CONCAT_LIMIT = 64 * 1024


def _json_dumps(obj):
    return json.dumps(obj, separators=(",", ":")).encode()


def _pickle_dumps(obj):
    # cloudpickle so that lambdas, closures and notebook-defined classes travel by value.
    return cloudpickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)


CODECS = {
    "json": (_json_dumps, json.loads),
    "marshal": (marshal.dumps, marshal.loads),
    "pickle": (_pickle_dumps, pickle.loads),
}


def get_codec(name):
    """Return ``(encode, decode)`` for a codec name, with a clear error for an unknown one."""
    try:
        return CODECS[name]
    except KeyError:
        raise ValueError(f"unknown codec {name!r}; choose one of {sorted(CODECS)}") from None


class Channel:
    """A message channel over a connected stream socket: ``send(obj)``, ``recv(timeout)``.

    Both ends of a Worker, RemoteWorker or WorkerServer connection are Channels. ``recv`` answers
    pings transparently, so a peer blocked in ``recv`` is observably alive.
    """

    def __init__(self, sock, codec="json", max_size=DEFAULT_MAX_SIZE):
        self._sock = sock
        self.codec = codec
        self._encode, self._decode = get_codec(codec)
        self.max_size = int(max_size)
        self._send_lock = threading.Lock()
        self._recv_lock = threading.RLock()
        self._pending = deque()  # DATA frames read while waiting for a PONG
        self._ping_ids = itertools.count()
        self._closed = False

    def fileno(self):
        return self._sock.fileno()

    @property
    def closed(self):
        return self._closed

    # -- sending ------------------------------------------------------------------------------
    def send(self, obj):
        """Encode ``obj`` with the channel's codec and send it as one frame."""
        payload = self._encode(obj)
        if len(payload) > self.max_size:
            raise FrameTooLargeError(
                f"message of {len(payload)} bytes exceeds max_size={self.max_size} bytes; "
                "pass a larger max_size= to both ends, or share the data through a SharedBuffer"
            )
        self._send_frame(DATA, payload)

    def _send_frame(self, kind, payload):
        header = _HEADER.pack(kind, len(payload))
        with self._send_lock:
            try:
                if len(payload) <= _CONCAT_LIMIT:
                    self._sock.sendall(header + payload)
                else:
                    self._sock.sendall(header)
                    self._sock.sendall(payload)
            except (BrokenPipeError, ConnectionResetError, OSError) as e:
                raise self._closed_error(f"send failed: {e}") from e

    # -- receiving ----------------------------------------------------------------------------
    def recv(self, timeout=None):
        """Return the next message; raise ``TimeoutError`` if none arrives within ``timeout``."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._recv_lock:
            if self._pending:
                return self._decode(self._pending.popleft())
            while True:
                kind, payload = self._recv_frame(deadline)
                if kind == DATA:
                    return self._decode(payload)
                if kind == PING:
                    self._send_frame(PONG, payload)
                # A PONG that nobody waits for (a ping that timed out) is dropped.

    def poll(self, timeout=0.0):
        """True if a message (or EOF) is ready to be received without blocking."""
        return bool(self._pending) or self._readable(timeout)

    def ping(self, timeout=5.0):
        """Round trip through the peer's ``recv`` loop; return the latency in seconds.

        Raises ``TimeoutError`` when the peer does not answer within ``timeout`` (it may be busy
        outside ``recv``) and ``ChannelClosedError`` when it is gone.
        """
        token = str(next(self._ping_ids)).encode()
        start = time.monotonic()
        deadline = start + timeout
        with self._recv_lock:
            self._send_frame(PING, token)
            while True:
                kind, payload = self._recv_frame(deadline)
                if kind == PONG and payload == token:
                    return time.monotonic() - start
                if kind == DATA:
                    self._pending.append(payload)
                elif kind == PING:
                    self._send_frame(PONG, payload)

    def _recv_frame(self, deadline):
        if deadline is not None and not self._readable(max(0.0, deadline - time.monotonic())):
            raise TimeoutError("no message received within the timeout")
        # Once the first byte is here the whole frame is read, so a timeout never leaves the
        # stream half-consumed.
        kind, size = _HEADER.unpack(self._recv_exact(_HEADER.size))
        if kind not in (DATA, PING, PONG):
            self._close_socket()
            raise ProtocolError(f"unknown frame kind {kind}; is the peer a miniray channel?")
        if size > self.max_size:
            self._close_socket()  # the payload is still in the stream: we cannot resynchronise
            raise FrameTooLargeError(
                f"received a frame of {size} bytes, over max_size={self.max_size} bytes; the "
                "channel was closed. Pass a larger max_size= to both ends if this is expected"
            )
        return kind, self._recv_exact(size)

    def _recv_exact(self, n):
        buf = bytearray(n)
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self._sock.recv_into(view[got:])
            except (ConnectionResetError, OSError) as e:
                if self._closed:
                    raise self._closed_error("the channel was closed") from e
                raise self._closed_error(f"receive failed: {e}") from e
            if k == 0:
                # The peer is gone for good: release the socket now rather than in a finaliser.
                error = self._closed_error("the peer closed the connection")
                self._close_socket()
                raise error
            got += k
        return bytes(buf) if n < _CONCAT_LIMIT else buf

    def _readable(self, timeout):
        if self._closed:
            return True  # so that the next recv reports the closure instead of hanging
        poller = select.poll()
        poller.register(self._sock, select.POLLIN | select.POLLHUP | select.POLLERR)
        return bool(poller.poll(None if timeout is None else timeout * 1000))

    def _closed_error(self, detail):
        """Hook: a subclass turns EOF into a more specific error (e.g. WorkerDiedError)."""
        return ChannelClosedError(detail)

    def close(self):
        """Close the socket; the peer sees end-of-file."""
        self._close_socket()

    def _close_socket(self):
        # Internal closes (EOF, a corrupt stream) only release the socket; subclasses' close()
        # may do more (Worker.close kills a child that does not exit).
        if not self._closed:
            self._closed = True
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()


def wait_readable(channels, timeout=None):
    """Return the channels among ``channels`` that have a message (or EOF) ready."""
    ready = [c for c in channels if c.poll(0)]
    if ready or timeout == 0:
        return ready
    with selectors.DefaultSelector() as sel:
        for c in channels:
            sel.register(c.fileno(), selectors.EVENT_READ, c)
        ready = {key.data for key, _ in sel.select(timeout)}
    return [c for c in channels if c in ready]


def set_pdeathsig(sig):
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux only)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
