"""A small Redis client: one socket, RESP2 encoded and parsed by hiredis, pipelines as lists.

miniray needs few commands and no client-side features, and every hop is on its hot path:
this client costs ~15 µs per pipelined round trip where redis-py costs ~40, and it imports in
milliseconds, which matters for a worker's cold start. A ``Connection`` serialises its callers
with a lock; threads that block (BLPOP, BLMPOP, XREAD BLOCK) use a connection of their own.
How a command is written (its encoding, Ctrl-C held until it is whole) is ``respwrite``'s job.
"""

from __future__ import annotations

import contextlib
import math
import select
import socket
import threading
import time
from urllib.parse import parse_qs, unquote, urlparse

import hiredis

from .respwrite import hold_ctrl_c, pack_commands, release_ctrl_c

__all__ = ["RedisError", "ReplyError", "ConnectionLost", "ReplyTimeout", "NoScriptError",
           "Connection", "Pipeline", "parse_url", "redact"]


class RedisError(Exception):
    """Base of this client's errors."""


class ReplyError(RedisError):
    """The server answered a command with an error."""


class NoScriptError(ReplyError):
    """EVALSHA named a script the server does not have (it restarted or was flushed)."""


class ConnectionLost(RedisError, ConnectionError):
    """The connection could not be made, or broke."""


class ReplyTimeout(RedisError):
    """``read_reply`` waited as long as it was told to; the reply is still owed."""


def _reply_error(message):
    text = message.decode(errors="replace") if isinstance(message, bytes) else str(message)
    if text.startswith("NOSCRIPT"):
        return NoScriptError(text)
    return ReplyError(text)


def redact(url: str) -> str:
    """The URL without its password, for messages and logs."""
    import re

    url = re.sub(r"(//[^:/@]*:)[^@]*@", r"\1***@", url)
    return re.sub(r"(password=)[^&]*", r"\1***", url)


def parse_url(url: str) -> dict:
    """``redis://[:password@]host[:port][/db]`` or ``unix:///path?password=...&db=N``."""
    u = urlparse(url)
    query = parse_qs(u.query)
    password = unquote(u.password) if u.password else query.get("password", [None])[0]
    username = unquote(u.username) if u.username else None
    if u.scheme == "unix":
        if not u.path:
            raise ValueError("a unix:// URL needs a socket path")
        db = int(query.get("db", ["0"])[0])
        return {"unix": u.path, "password": password, "username": username, "db": db}
    if u.scheme not in ("redis", ""):
        raise ValueError(f"unsupported scheme {u.scheme!r} (use redis:// or unix://)")
    db = int((u.path or "/0").lstrip("/") or 0)
    return {"host": u.hostname or "127.0.0.1", "port": u.port or 6379, "password": password,
            "username": username, "db": db}


class Connection:
    """One connection to a server; ``execute`` and ``pipeline`` are safe across threads."""

    def __init__(self, url: str, connect_timeout: float = 5.0):
        self.url = url
        self.params = parse_url(url)
        self.connect_timeout = connect_timeout
        self._sock: socket.socket | None = None
        self._reader = None
        self._lock = threading.Lock()
        self._owed = 0  # replies to commands sent with send_deferred, not read yet
        self._buf = bytearray(_READ_SIZE)
        self._other = None
        self.on_deferred_error = None  # called with each error reply among them

    # -- connection ---------------------------------------------------------------------------
    def _connect(self) -> None:
        p = self.params
        try:
            if "unix" in p:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.settimeout(self.connect_timeout)
                sock.connect(p["unix"])
            else:
                sock = socket.create_connection((p["host"], p["port"]), self.connect_timeout)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            sock.settimeout(None)
        except OSError as e:
            raise ConnectionLost(f"cannot connect to {redact(self.url)}: {e}") from None
        self._sock = sock
        self._poller = select.poll()  # (not select.select: no limit on the fd number)
        self._poller.register(sock.fileno(), select.POLLIN)
        self._other = None  # (fd, a poller of both) for wait_reply_or
        self._owed = 0
        self._reader = hiredis.Reader(replyError=_reply_error)
        hello = []
        if p.get("password"):
            hello.append(("AUTH", p["username"], p["password"]) if p.get("username")
                         else ("AUTH", p["password"]))
        if p.get("db"):
            hello.append(("SELECT", p["db"]))
        if hello:
            replies = self._roundtrip(hello)
            for r in replies:
                if isinstance(r, ReplyError):
                    self.close()
                    raise r

    def __del__(self):  # like redis-py: a dropped client closes its socket quietly
        try:
            self.close()
        except Exception:
            pass

    def __enter__(self) -> "Connection":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _roundtrip(self, commands) -> list:
        if commands and commands[0] is not None:  # None: replies owed, nothing to send
            self._send(commands)
        return [self._next_reply() for _ in commands]

    def _send(self, commands) -> None:
        try:
            for piece in pack_commands(commands):
                self._sock.sendall(piece)
        except OSError as e:
            self.close()
            raise ConnectionLost(f"lost the connection to {redact(self.url)}: {e}") from None

    def _next_reply(self, deadline: float | None = None):
        """The next reply off the socket; with a ``deadline`` (monotonic) ReplyTimeout when it
        has not come by then, the connection left as it is (the reply is still owed)."""
        sock, reader = self._sock, self._reader
        try:
            reply = reader.gets()
            while reply is False:
                # wait in poll(POLLIN), not in recv: a process asleep in recv on a unix
                # socket is also woken each time the server reads what it sent (the freed
                # buffer space wakes every sleeper on the socket); poll wakes for data only
                if deadline is None:
                    self._poller.poll()
                elif not self._poller.poll(max(0, math.ceil((deadline - time.monotonic())
                                                            * 1000))):
                    raise ReplyTimeout(f"no reply from {redact(self.url)} in time")
                # into a buffer kept for the connection: sock.recv(n) would allocate (and,
                # for a large n, mmap and unmap) n bytes on every read
                n = sock.recv_into(self._buf)
                if not n:
                    raise ConnectionLost(f"the server at {redact(self.url)} closed the "
                                         "connection")
                reader.feed(self._buf, 0, n)
                reply = reader.gets()
            return reply
        except OSError as e:
            self.close()
            raise ConnectionLost(f"lost the connection to {redact(self.url)}: {e}") from None
        except ConnectionLost:
            self.close()
            raise

    # -- commands -----------------------------------------------------------------------------
    def execute(self, *args):
        """Run one command; raise its error reply."""
        reply = self.pipeline_raw([args])[0]
        if isinstance(reply, ReplyError):
            raise reply
        return reply

    # A write or a read that is cut short (KeyboardInterrupt: a Ctrl-C lands anywhere)
    # leaves the server holding half a command, or the connection not knowing which reply
    # belongs to which command: the connection is then closed, and the next command connects
    # afresh (instead of reading another command's reply as its own). Plain try/except, not
    # a context manager: this is on every round trip.

    def pipeline_raw(self, commands: list) -> list:
        """Send commands in one write, read every reply; error replies are returned."""
        with self._lock:
            if self._sock is None:
                self._connect()
            try:
                if self._owed:
                    self._read_owed()
                return self._roundtrip(commands)
            except (ConnectionLost, ReplyTimeout):
                raise
            except BaseException:
                self.close()
                raise

    def send_deferred(self, commands: list) -> None:
        """Send commands and return at once; their replies are read before the next
        command's (or by ``read_deferred``). An error among them goes to
        ``on_deferred_error``; a lost connection raises here or at that later read."""
        with self._lock:
            if self._sock is None:
                self._connect()
            held = hold_ctrl_c()  # (a held Ctrl-C is raised after the write, whole)
            try:
                self._send(commands)
                self._owed += len(commands)
            except ConnectionLost:
                raise
            except BaseException:  # a second Ctrl-C, in a write that does not end
                self.close()
                raise
            finally:
                if held:
                    release_ctrl_c()

    @contextlib.contextmanager
    def _whole(self):
        """The same for the rarer reads below."""
        try:
            yield
        except (ConnectionLost, ReplyTimeout):
            raise
        except BaseException:
            self.close()
            raise

    def send_command(self, *args) -> None:
        """Send one command whose reply ``read_reply`` returns later, maybe in another thread
        (a blocking pop that whichever thread waits reads)."""
        self.send_deferred([args])

    def read_reply(self, timeout: float | None = None):
        """The reply to the oldest command sent and not read yet (an error reply is returned).

        After ``timeout`` seconds without it (a server that hangs), or when interrupted
        (KeyboardInterrupt), the reply is still owed: the next call reads it. Nothing that
        the server sent is dropped."""
        with self._lock:
            self._check_owed()
            reply = self._next_reply(None if timeout is None else time.monotonic() + timeout)
            self._owed -= 1
            return reply

    @property
    def owed(self) -> int:
        """How many replies of commands sent are still to be read (0 once the connection is
        lost: a new one owes nothing)."""
        return self._owed if self._sock is not None else 0

    def _check_owed(self) -> None:
        if self._sock is None or not self._owed:
            raise ConnectionLost(f"no reply is owed on the connection to {redact(self.url)} "
                                 "(it was lost)")

    def wait_reply_or(self, fd: int, timeout: float | None = None) -> bool:
        """Wait until the owed reply can be read (True: ``read_reply`` takes it) or ``fd``
        is readable (False); ReplyTimeout after ``timeout`` seconds with neither."""
        with self._lock:
            self._check_owed()
            if self._reader.has_data():  # (part of) a reply read already
                return True
            if self._other is None or self._other[0] != fd:
                poller = select.poll()
                poller.register(self._sock.fileno(), select.POLLIN)
                poller.register(fd, select.POLLIN)
                self._other = (fd, poller)
            ready = self._other[1].poll(None if timeout is None
                                        else max(0, math.ceil(timeout * 1000)))
            if not ready:
                raise ReplyTimeout(f"no reply from {redact(self.url)} in time")
            return not any(f == fd for f, _ in ready)

    def read_deferred(self, n: int | None = None) -> None:
        """Read the replies still owed for ``send_deferred`` commands (the oldest ``n``)."""
        with self._lock, self._whole():
            if self._owed and self._sock is not None:
                self._read_owed(n)

    def read_available(self) -> None:
        """Read the owed replies the server has already sent, without waiting for more (a
        server that hangs must not hold this connection's lock)."""
        with self._lock, self._whole():
            while self._owed and self._sock is not None:
                try:
                    reply = self._next_reply(deadline=0.0)
                except ReplyTimeout:
                    return
                self._owed -= 1
                if isinstance(reply, ReplyError) and self.on_deferred_error is not None:
                    self.on_deferred_error(reply)

    def _read_owed(self, n: int | None = None) -> None:
        n = self._owed if n is None else min(n, self._owed)
        self._owed -= n
        replies = self._roundtrip([None] * n) if n else []
        for r in replies:
            if isinstance(r, ReplyError) and self.on_deferred_error is not None:
                self.on_deferred_error(r)

    def fetch_into(self, commands: list, views: list, stall: float = 20.0) -> list:
        """Run ``commands`` (one write), each answered by a bulk string of exactly its
        view's size, and read each reply's bytes off the socket straight into its view
        (``recv_into``: no copy through the parser, no ``bytes`` of it). Returns, per
        command, None (its view is filled) or why not: an error reply, or a ``ValueError``
        for a missing value (nil). A reply of another size, or ``stall`` seconds without a
        byte, loses the connection (ConnectionLost): the stream is out of step then."""
        with self._lock:
            if self._sock is None:
                self._connect()
            try:
                if self._owed:
                    self._read_owed()
                self._send(commands)
                return [self._bulk_into(v, stall) for v in views]
            except ConnectionLost:
                raise
            except OSError as e:
                self.close()
                raise ConnectionLost(f"lost the connection to {redact(self.url)}: {e}") from None
            except BaseException:
                self.close()
                raise

    def _bulk_into(self, view, stall: float):
        """One bulk reply read into ``view`` (see ``fetch_into``); hiredis has read nothing
        of it (every reply before it was read whole)."""
        line = self._raw_line(stall)
        if line[:1] == b"-":
            return _reply_error(line[1:])
        if line[:1] != b"$":
            self.close()
            raise ConnectionLost(f"unexpected reply {line[:40]!r} from {redact(self.url)}")
        n = int(line[1:])
        if n < 0:
            return ValueError("no such value (nil)")
        if n != view.nbytes:
            self.close()
            raise ConnectionLost(f"a value of {n} bytes from {redact(self.url)} where "
                                 f"{view.nbytes} were expected")
        self._recv_exact(view, stall)
        self._recv_exact(memoryview(bytearray(2)), stall)  # its \r\n
        return None

    def _wait_data(self, stall: float) -> None:
        if not self._poller.poll(max(0, math.ceil(stall * 1000))):
            self.close()
            raise ConnectionLost(f"the server at {redact(self.url)} sent nothing for "
                                 f"{stall:.0f} s in the middle of a value")

    def _raw_line(self, stall: float) -> bytes:
        """The next line on the socket (no more is read: what follows is a value's)."""
        sock, deadline = self._sock, time.monotonic() + stall
        while True:
            self._wait_data(stall)
            peek = sock.recv(64, socket.MSG_PEEK)
            if not peek:
                self.close()
                raise ConnectionLost(f"the server at {redact(self.url)} closed the connection")
            end = peek.find(b"\r\n")
            if end >= 0:
                line = memoryview(bytearray(end + 2))
                self._recv_exact(line, stall)
                return bytes(line[:end])
            if len(peek) >= 64:
                self.close()
                raise ConnectionLost(f"a reply line longer than 64 bytes from "
                                     f"{redact(self.url)}")
            if time.monotonic() > deadline:  # (the poll sees the half line: bound it here)
                self.close()
                raise ConnectionLost(f"the server at {redact(self.url)} sent half a reply "
                                     f"line and nothing more for {stall:.0f} s")
            time.sleep(0.0005)  # half a line came (it is short: the rest is on its way)

    def _recv_exact(self, view, stall: float) -> None:
        sock, at, n = self._sock, 0, view.nbytes
        while at < n:
            self._wait_data(stall)
            got = sock.recv_into(view[at:], n - at)
            if not got:
                self.close()
                raise ConnectionLost(f"the server at {redact(self.url)} closed the connection")
            at += got

    def pipeline(self) -> "Pipeline":
        return Pipeline(self)

    def ping(self) -> bool:
        return self.execute("PING") in (b"PONG", "PONG")


_READ_SIZE = 256 * 1024  # bytes read from the socket at a time


class Pipeline:
    """Commands queued and sent in one round trip; ``execute`` raises the first error reply
    (after reading every reply, so the connection stays in step)."""

    __slots__ = ("conn", "commands")

    def __init__(self, conn: Connection):
        self.conn, self.commands = conn, []

    def __len__(self) -> int:
        return len(self.commands)

    def command(self, *args) -> "Pipeline":
        self.commands.append(args)
        return self

    def send_deferred(self) -> None:
        """Send the commands without waiting for replies (see ``Connection.send_deferred``)."""
        commands, self.commands = self.commands, []
        if commands:
            self.conn.send_deferred(commands)

    def execute(self, raise_on_error: bool = True) -> list:
        if not self.commands:
            return []
        commands, self.commands = self.commands, []
        replies = self.conn.pipeline_raw(commands)
        if raise_on_error:
            for r in replies:
                if isinstance(r, ReplyError):
                    raise r
        return replies
