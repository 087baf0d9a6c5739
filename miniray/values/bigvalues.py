"""Large buffers through the server: stored in parts beside their message (a result message, a
chunk's payload), read back straight into one buffer. Owns the ``big:{job}:{id}`` keys.

Where shared memory cannot carry them (the other side is on another machine, or
``MINIRAY_SHM=0``), each out-of-band pickle buffer of at least ``MIN_BYTES`` goes into a hash
of its own, one field per part (at most what the server takes in one value, see
``payloads``), written from the buffer's memory as views (no copy, no ``bytes`` of it) in one
pipeline. What travels in its place is small: a :class:`Ref` (key, size, part size) inside a
result message, a marker frame in a chunk. The reader fetches the parts (pipelined HGETs, a
window at a time) with ``recv_into`` straight into one preallocated ``bytearray``
(``resp.Connection.fetch_into``), and the value unpickled (a numpy array, say) points into
that buffer: its only copy. So a client's peak memory for a result is the result plus a
socket buffer, a task's for an argument the argument, and a value of several GB travels
through a server that takes 512 MB (or 1 MB) per value.

Ownership:

* Results (task process -> client): the task process writes the key (TTL: the client's grace
  and a minute) before it sends the message; the client deletes it once read. A message
  nobody reads (a duplicate after a retry, a client that died) leaves it to its TTL.
* Arguments (client -> task process): the client writes the keys before it queues the chunk,
  renews them while the chunk may run (a retry reads them again), and deletes them when it
  has ended (its ``ArgumentKeys``); a client that died leaves them to their TTL. Kept jobs
  (``keep=True``) outlive their client: their arguments stay inline.
* A key gone when it is read (expired, the server restarted) fails only its own item or
  task, with an error that says so.
"""

from __future__ import annotations

import os
import struct
import threading

from miniray.errors import PayloadTooLargeError
from miniray.resp import Connection, RedisError

from .payloads import _human, check_room

__all__ = ["MIN_BYTES", "Ref", "ResultStore", "reading", "fetch", "read_parts", "mark",
           "store", "open_frames", "ArgumentKeys", "stats"]

MIN_BYTES = 1 << 20  # smaller buffers stay in the message (a key costs a round trip)
_WINDOW = 64 << 20  # bytes asked for at a time: bounds the server's output buffer for us

#: bytes this process stored and read this way (tests and the bench read it)
stats = {"stored": 0, "read": 0}
_local = threading.local()  # the server URL that the decode running in this thread reads from
_conns: dict = {}  # server URL -> the connection this process reads big values on
_lock = threading.Lock()


class Ref:
    """A result's buffer on the server, as it travels: unpickled, it is ``fetch``'s buffer."""

    __slots__ = ("key", "size", "part")

    def __init__(self, key: str, size: int, part: int):
        self.key, self.size, self.part = key, size, part

    def __reduce__(self):
        return fetch, (self.key, self.size, self.part)


class ResultStore:
    """The task process's end: ``sink(buf)`` stores a big buffer under a key of ``job`` and
    returns its ``Ref`` (else ``buf`` itself, which then travels in the message)."""

    def __init__(self, conn: Connection, keys, job: str, part_size, ttl: int):
        # (``part_size(conn)``: the server's limit, asked only when a buffer is big)
        self.conn, self.keys, self.job, self.ttl = conn, keys, job, ttl
        self.part_size = part_size

    def sink(self, buf):
        raw = buf.raw() if hasattr(buf, "raw") else memoryview(buf)
        view = raw.cast("B") if raw.format != "B" or raw.ndim != 1 else raw
        size = view.nbytes
        if size < MIN_BYTES:
            return buf
        try:  # (a write that starts under maxmemory is let through, however big: ask first)
            check_room(self.conn, size, "results of these tasks")
        except PayloadTooLargeError:
            return buf  # in the message, whose own size check fails its items clearly
        key = self.keys.big(self.job, os.urandom(8).hex())
        part = self.part_size(self.conn)
        try:
            refused = store(self.conn, [(key, view, part)], self.ttl)
        except RedisError:
            return buf  # (the message then says what became of the server)
        if refused is not None:  # (maxmemory) in the message, whose size check fails its
            return buf           # items with a clear error
        return Ref(key, size, part)


def reading(url: str) -> None:
    """Result messages decoded in this thread from now on read their big buffers from the
    server at ``url`` (set before each decode: one attribute, not a context manager, on the
    path of every result message)."""
    _local.url = url


def _conn(url: str) -> Connection:
    with _lock:
        conn = _conns.get(url)
        if conn is None:
            conn = _conns[url] = Connection(url)
        return conn


def read_parts(conn: Connection, key: str, size: int, part: int) -> bytearray:
    """The buffer stored under ``key`` (``size`` bytes in parts of ``part``), read straight
    into one ``bytearray``; raises ``LookupError`` when (a part of) it is gone, RedisError
    when the server is."""
    buf = bytearray(size)
    view = memoryview(buf)
    spans = [(i, at) for i, at in enumerate(range(0, size, part))]
    step = max(1, _WINDOW // max(1, part))
    for k in range(0, len(spans), step):
        window = spans[k:k + step]
        errors = conn.fetch_into([("HGET", key, i) for i, _ in window],
                                 [view[at:at + part] for _, at in window])
        bad = next((e for e in errors if e is not None), None)
        if bad is not None:  # (nil: gone; else the server's error reply)
            raise bad if isinstance(bad, RedisError) else LookupError(str(bad))
    stats["read"] += size
    return buf


def _why(e: BaseException) -> str:
    if isinstance(e, LookupError):
        return "it is gone (deleted or expired)"
    return f"{type(e).__name__}: {e}"


def fetch(key: str, size: int, part: int):
    """A ``Ref`` unpickled: its buffer, read from the server and deleted there; where that
    fails, the failure in its place (``protocol`` fails that item alone with it)."""
    from miniray.errors import MinirayError
    from miniray.protocol import _Failed

    url = getattr(_local, "url", None)
    if url is None:
        return _Failed(MinirayError(
            f"a result's buffer of {size} bytes is on the server ({key}), and this reader "
            "has no server to read it from"))
    conn = _conn(url)
    try:
        buf = read_parts(conn, key, size, part)
    except (LookupError, RedisError, ValueError) as e:
        return _Failed(MinirayError(
            f"a result's buffer of {_human(size)} could not be read from the server "
            f"({key}): {_why(e)}. It expires when the client is away longer than "
            "MINIRAY_CLIENT_GRACE_SECONDS, and a server that restarts loses it; run the task "
            "again"))
    try:
        conn.send_deferred([("UNLINK", key)])  # (its reply is read with the next read)
    except RedisError:
        pass  # (its TTL deletes it)
    return buf


# -- arguments (client -> task) ---------------------------------------------------------------
# An argument frame (an out-of-band buffer, ``serialization.dumps``) of at least MIN_BYTES
# bound for workers that cannot share memory with the client is stored the same way by the
# client (``store``, before its chunk is queued) and replaced in the chunk by a short marker;
# the task process reads it back into one buffer (``open_frames``). The key lives while its
# chunk may still run (a retry reads it again): the client renews it and deletes it when the
# chunk has ended (see ``miniray.client.results.Results.upkeep``).
_MARK = b"\x00miniray-big\x00"
_SIZES = struct.Struct("!QQ")  # size, part size; the key follows
_MAX_MARK = 1024


def mark(frames: list, part: int, keys, job: str) -> tuple[list, list]:
    """``frames`` with each out-of-band buffer of at least MIN_BYTES replaced by a marker
    naming a new key; and ``[(key, buffer)]`` to ``store`` before the chunk is queued."""
    out, bigs = None, []
    for i in range(1, len(frames)):
        view = memoryview(frames[i]).cast("B")
        if view.nbytes < MIN_BYTES:
            continue
        key = keys.big(job, os.urandom(8).hex())
        if out is None:
            out = list(frames)
        out[i] = _MARK + _SIZES.pack(view.nbytes, part) + key.encode()
        bigs.append((key, view, part))
    return (frames if out is None else out), bigs


def store(conn: Connection, bigs: list, ttl: int):
    """Store ``mark``'s buffers, each part a command of its own, in one pipeline (views: no
    copy). None when all are stored; else the server's refusal (what was stored is deleted)."""
    pipe = conn.pipeline()
    for key, view, part in bigs:
        for i, at in enumerate(range(0, view.nbytes, part)):
            pipe.command("HSET", key, i, view[at:at + part])
        pipe.command("EXPIRE", key, ttl)
    replies = pipe.execute(raise_on_error=False)
    refused = next((r for r in replies if isinstance(r, RedisError)), None)
    if refused is None:
        stats["stored"] += sum(view.nbytes for _, view, _ in bigs)
        return None
    try:
        conn.execute("UNLINK", *[key for key, _, _ in bigs])
    except RedisError:
        pass  # (their TTL)
    return refused


def open_frames(frames: list, conn: Connection) -> list:
    """A task's frames with ``mark``'s markers read back from the server, each into one
    buffer; a buffer that is gone (its chunk ended, its client died) raises MinirayError."""
    out = None
    for i in range(1, len(frames)):
        f = frames[i]
        if len(f) > _MAX_MARK or bytes(f[:len(_MARK)]) != _MARK:
            continue
        size, part = _SIZES.unpack_from(f, len(_MARK))
        key = bytes(f[len(_MARK) + _SIZES.size:]).decode()
        try:
            buf = read_parts(conn, key, size, part)
        except (LookupError, RedisError, ValueError) as e:
            from miniray.errors import MinirayError

            raise MinirayError(
                f"this task's argument of {_human(size)} could not be read from the server "
                f"({key}): {_why(e)}. Its client ended (or restarted the job), the task had "
                "finished already, or the server lost it; submit it again") from e
        if out is None:
            out = list(frames)
        out[i] = buf
    return frames if out is None else out


class ArgumentKeys:
    """An executor's big arguments on the server, by chunk: renewed while their chunk may
    still run, deleted once it has ended (both with the executor's upkeep: no round trip on
    the caller's path)."""

    def __init__(self):
        self._lock = threading.Lock()
        self._live: dict = {}  # chunk -> its keys
        self._doomed: list = []  # keys of chunks that ended

    def store(self, conn: Connection, chunk: int, bigs: list, ttl: int):
        """``store`` a chunk's buffers (``mark``'s), then track them; the refusal, or None."""
        refused = store(conn, bigs, ttl)
        if refused is None:
            with self._lock:
                self._live[chunk] = [key for key, _, _ in bigs]
        return refused

    def end(self, chunk: int) -> None:
        """The chunk has ended (or never will run): its keys go at the next ``upkeep``."""
        with self._lock:
            keys = self._live.pop(chunk, None)
            if keys:
                self._doomed += keys

    def upkeep(self, pipe, ttl: int, pending) -> None:
        """Add to ``pipe`` the renewal of the keys of chunks still ``pending`` (a container
        of chunk ids), and the deletion of the rest (a chunk that ended on a path that did
        not say so: cancelled, abandoned, or the executor closing)."""
        live = []
        with self._lock:
            doomed, self._doomed = self._doomed, []
            for chunk, keys in list(self._live.items()):
                if chunk in pending:
                    live += keys
                else:
                    del self._live[chunk]
                    doomed += keys
        if doomed:
            pipe.command("UNLINK", *doomed)
        for key in live:
            pipe.command("EXPIRE", key, ttl)
