"""The wire format between executors and workers, encoded and decoded only here.

A *chunk* is the unit that travels: one ``submit`` or ``chunksize`` items of a ``map``. Its
payload is a list of frames (stored as fields of ``tasks:{job}``)::

    frame 0   = CHUNK_HEAD (version, fn sha256, first task index, item count, layout) +
                pickle stream
    frame 1.. = out-of-band pickle buffers (large arrays), never copied into frame 0

The fixed-size head lets a worker learn the function and the task range without unpickling
user data. No stored field may exceed the server's ``proto-max-bulk-len`` (512 MB by
default), so a frame bigger than ``part_size`` travels as several fields: the head then
says how many fields make each frame (its *layout*), is a field of its own, and the worker
joins each frame's fields back (``decode_chunk``).

A *result message* (list ``res:{client}``) is ``b"R"`` + version + u32 header length + pickled
:class:`ResultHeader` + a blob written by ``encode_batches``: a plain pickle of ``(indices, values,
errors, times)`` batches, one per chunk in the header (``indices``: None, a list, or ``(start,
stop)``; see ``miniray.worker.task``). ``times`` (None when unknown) are the items' timings on the
worker, as the bytes of an ``array('d')``: the worker's wall-clock offset (epoch seconds minus its
monotonic clock), then each value's monotonic start, then the last one's end (an item ends where the
next starts); ``item_times`` reads them. Values of plain builtin types travel inline; any other
value (its position in ``packed``), and every exception, is pickled on its own inside the blob
(``(stream, buffers)``, protocol 5), so the client unpickles it alone and a value it cannot unpickle
(a class missing here) fails only its own item (``decode_batches``). A message bigger than a part
goes as several list elements, pushed by one script call: ``b"M"`` + u32 count of the parts that
follow + the message's first bytes, then the parts (``Assembler`` puts them back together). The
reaper's Lua writes ``b"L" job "|" chunk "|" worker`` for a chunk lost with its worker.
"""

from __future__ import annotations

import io
import pickle
import struct
import threading
from array import array
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "PROTOCOL_VERSION",
    "PART_MAX",
    "DEFAULT_BULK_LIMIT",
    "SMALLEST_BULK_LIMIT",
    "part_size",
    "ChunkHead",
    "encode_chunk",
    "decode_chunk",
    "ResultHeader",
    "encode_result",
    "encode_batches",
    "decode_batches",
    "item_times",
    "decode_message",
    "Assembler",
    "LostChunk",
]

# 3: frames split into parts (a layout in the chunk head), result messages in parts, values
#    pickled one by one, a version byte in result messages
# 4: per-item timings in each batch of a result message, the slot in its header
# 5: big out-of-band buffers beside the chunk or the result message, on the server, a
#    marker or a ``bigvalues.Ref`` in their place (see ``miniray.values.bigvalues``)
PROTOCOL_VERSION = 5
_HEAD = struct.Struct("!B32sQII")  # version, sha256 digest, first task index, item count,
#                                    frames in the layout that follows (0: one field a frame)
_U32 = struct.Struct("!I")
_RES = struct.Struct("!BI")  # after b"R": version, header length

PART_MAX = 256 * 1024 * 1024  # bytes: the most one stored field or list element carries
DEFAULT_BULK_LIMIT = 512 * 1024 * 1024  # the server's proto-max-bulk-len, unless it says
SMALLEST_BULK_LIMIT = 1024 * 1024  # Redis and Valkey accept no lower proto-max-bulk-len


def part_size(bulk_limit: int | None) -> int:
    """The most bytes one field may carry under a server whose ``proto-max-bulk-len`` is
    ``bulk_limit`` (None: unknown, e.g. CONFIG refused: the default's)."""
    return max(4096, min(PART_MAX, (bulk_limit or DEFAULT_BULK_LIMIT) - 4096))


class ChunkHead(NamedTuple):  # a tuple: made for every chunk a worker takes
    fn_sha: str
    start: int
    count: int


def encode_chunk(fn_sha: str, start: int, count: int, frames: list,
                 part: int = PART_MAX) -> list:
    """The fields to store for a chunk of ``frames`` (see ``serialization.dumps``): the head
    in front of frame 0, and as they are; a frame bigger than ``part`` is cut into views
    (no copy) and the head, a field of its own then, says how many fields each frame has."""
    digest = bytes.fromhex(fn_sha)
    if len(frames[0]) + _HEAD.size <= part and all(len(f) <= part for f in frames[1:]):
        return [_HEAD.pack(PROTOCOL_VERSION, digest, start, count, 0) + frames[0], *frames[1:]]
    fields, counts = [], []
    for f in frames:
        view = memoryview(f).cast("B")
        pieces = [view[i : i + part] for i in range(0, view.nbytes, part)] or [b""]
        counts.append(len(pieces))
        fields += pieces
    counts[0] += 1  # the head is frame 0's first field
    head = _HEAD.pack(PROTOCOL_VERSION, digest, start, count, len(frames))
    return [head + struct.pack(f"!{len(counts)}I", *counts), *fields]


def decode_chunk(fields: list) -> tuple[ChunkHead, list]:
    """A chunk's head and its frames (frame 0: the pickle stream) from its stored fields:
    views where a frame is one field, joined (one copy) where it was cut into several."""
    view = memoryview(fields[0])
    if view.nbytes < _HEAD.size:
        raise ValueError(f"{view.nbytes} bytes, shorter than a chunk's head ({_HEAD.size})")
    if view[0] != PROTOCOL_VERSION:
        from .errors import MinirayError

        raise MinirayError(
            f"task encoded with protocol {view[0]}, this worker speaks {PROTOCOL_VERSION}: "
            "the notebook and the workers run different miniray versions; install the same "
            "version on both"
        )
    _, digest, start, count, n = _HEAD.unpack_from(view)
    head = ChunkHead(digest.hex(), start, count)
    if not n:
        return head, [view[_HEAD.size :], *fields[1:]]
    counts = struct.unpack_from(f"!{n}I", view, _HEAD.size)
    frames, at = [], 0
    for c in counts:
        group = list(fields[at : at + c])
        if at == 0:
            group[0] = view[_HEAD.size + 4 * n :]
        at += c
        frames.append(group[0] if len(group) == 1 else b"".join(group))
    return head, frames


class ResultHeader(NamedTuple):  # a tuple: decoded for every result message
    worker: str
    host: str
    pid: int
    chunks: list  # [(chunk id, final)], one per batch in the blob
    slot: int | None = None  # the worker's slot that ran them (None: the worker itself)


@dataclass(frozen=True)
class LostChunk:
    """A chunk that will never report: its worker was lost past the retries, or (``reason``
    "closing") while its job was shutting down with its queue dropped."""

    job: str
    chunk: int
    worker: str
    reason: str = ""


def encode_result(header: ResultHeader, blob: bytes, part: int = PART_MAX) -> list:
    """The list elements of one result message: one, or (bigger than ``part``) several that
    the client's ``Assembler`` joins; pushed together by one script call."""
    head = pickle.dumps(tuple(header), protocol=5)
    prefix = b"R" + _RES.pack(PROTOCOL_VERSION, len(head)) + head
    if len(prefix) + len(blob) <= part:
        return [prefix + blob]
    view = memoryview(blob).cast("B")
    pieces = [view[i : i + part] for i in range(0, view.nbytes, part)]
    return [b"M" + _U32.pack(len(pieces)) + prefix, *pieces]


class Assembler:
    """Puts result messages that came in parts back together (one per reader: parts pushed
    by one script call are consecutive in the list, but one pop may end among them)."""

    __slots__ = ("parts", "left")

    def __init__(self):
        self.parts: list = []
        self.left = 0

    def feed(self, element):
        """The message ``element`` completes (``bytes``, or a list of parts), else None."""
        if self.left:
            self.parts.append(memoryview(element))
            self.left -= 1
            if self.left:
                return None
            parts, self.parts = self.parts, []
            return parts
        if element[:1] == b"M":
            (self.left,) = _U32.unpack_from(element, 1)
            self.parts = [memoryview(element)[5:]]
            return None
        return element


def decode_message(msg):
    """Return ``(ResultHeader, blob)`` or a :class:`LostChunk`; ``msg`` is one element, or
    the parts ``Assembler`` gathered (the blob is then a list of views)."""
    parts = None
    if type(msg) is list:
        parts, msg = msg[1:], msg[0]
    tag = msg[:1]
    if tag == b"R":
        version, n = _RES.unpack_from(msg, 1)
        at = 1 + _RES.size
        if version == 0:  # protocol 2 had no version byte (its u32 length starts with 0)
            (n,), at = _U32.unpack_from(msg, 1), 1 + _U32.size
        header = ResultHeader(*pickle.loads(msg[at : at + n])[:5])  # (4 fields before v4)
        if version != PROTOCOL_VERSION:
            from .errors import MinirayError

            return header, MinirayError(
                f"{header.host} sent a result in protocol {version}, this client speaks "
                f"{PROTOCOL_VERSION}: the notebook and the workers run different miniray "
                "versions; install the same version on both")
        rest = memoryview(msg)[at + n :]
        return header, rest if parts is None else [rest, *parts]
    if tag == b"L":
        job, chunk, worker = bytes(msg[1:]).decode().split("|", 2)
        reason = ""
        if worker.endswith("|closing"):
            worker, reason = worker[: -len("|closing")], "closing"
        return LostChunk(job, int(chunk), worker, reason)
    raise ValueError(f"unknown result message tag {bytes(tag)!r}")


# -- the blob: values one by one -------------------------------------------------------------
# The blob is one plain pickle whose builtin values (numbers, strings, bytes, lists, dicts,
# ...) are written by the C pickler as ever. Every other object (the pickler's
# reducer_override is called only for those) is pickled on its own and travels as a call to
# ``_unpack(stream, buffers)``: on the client that call unpickles it, and a failure becomes a
# ``_Failed`` in its place instead of failing the whole blob.
_OOB_MIN = 64 * 1024  # smaller buffers stay in the value's own stream
_local = threading.local()  # the failures of the decode running in this thread


class _Failed:
    """What a value that could not be unpickled here leaves in its place."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException):
        self.error = error


def _unpack(stream, buffers):
    for b in buffers:
        if type(b) is _Failed:  # a buffer that could not be had (``shm.attach``): its error
            failures = getattr(_local, "failures", None)
            if failures is not None:
                failures.append(b)
            return b
    try:
        return pickle.loads(stream, buffers=buffers)
    except Exception as e:
        failed = _Failed(e)
        failures = getattr(_local, "failures", None)
        if failures is not None:
            failures.append(failed)
        return failed


def pack_value(obj) -> tuple:
    """``obj`` pickled on its own: ``(stream, buffers)``; large buffers stay PickleBuffers,
    which the blob's pickler writes once (no copy into the stream first). Raises what
    pickling raises (cloudpickle covers local classes and lambdas)."""
    bufs: list = []

    def keep(buf):
        if buf.raw().nbytes < _OOB_MIN:
            return True
        bufs.append(buf)
        return False

    try:
        stream = pickle.dumps(obj, protocol=5, buffer_callback=keep)
    except Exception:
        import cloudpickle

        bufs.clear()
        stream = cloudpickle.dumps(obj, protocol=5, buffer_callback=keep)
    sink = getattr(_local, "sink", None)
    if sink is not None and bufs:  # big buffers to shared memory (see ``shm``)
        bufs = [sink(b) for b in bufs]
    return stream, bufs


class _BlobPickler(pickle.Pickler):
    def reducer_override(self, obj):
        if obj is _unpack:
            return NotImplemented  # (by reference, as any function)
        try:
            return _unpack, pack_value(obj)
        except Exception as why:
            if not isinstance(obj, BaseException):
                raise
            from .errors import SerializationError

            # (a task process sends only exceptions it checked; this is for the worker's)
            return _unpack, pack_value(SerializationError(
                f"the task raised {type(obj).__name__}, which cannot be pickled to travel "
                f"back ({type(why).__name__}: {why})"))


def _dumps(obj) -> bytes:
    f = io.BytesIO()
    _BlobPickler(f, protocol=5).dump(obj)
    return f.getvalue()


def encode_batches(batches, on_unpicklable=None, sink=None) -> bytes:
    """The blob of a result message: ``batches`` are ``(indices, values, errors[, times])``,
    errors mapping an item index (-1: every item left) to ``(exception, traceback, pid)``,
    times as the module's docstring says (bytes, or None). A value that cannot be pickled is
    handed to ``on_unpicklable(value, exc)``, whose return (an exception) fails that item
    instead (without it, pickling's error is raised). ``sink(buffer)`` may put a large
    out-of-band buffer elsewhere and return what travels in its place (``shm.Ref``)."""
    _local.sink = sink
    try:
        return _encode_batches(batches, on_unpicklable)
    finally:
        _local.sink = None


def _encode_batches(batches, on_unpicklable) -> bytes:
    """``encode_batches`` with its sink set."""
    batches = [((b[0].start, b[0].stop) if type(b[0]) is range else b[0], b[1], b[2],
                b[3] if len(b) > 3 else None) for b in batches]
    try:
        return _dumps(batches)
    except Exception:
        if on_unpicklable is None:
            raise
    sink, _local.sink = _local.sink, None  # (a trial pickling places nothing)
    for indices, values, errors, _ in batches:  # find the culprits; each becomes an error
        positions = _positions(indices, len(values))
        for k, value in enumerate(values):
            try:
                _dumps(value)
            except Exception as e:
                values[k] = None
                errors[positions[k]] = (on_unpicklable(value, e), "", None)
    _local.sink = sink
    return _dumps(batches)


def _positions(indices, n: int) -> list:
    if indices is None:
        return list(range(n))
    if type(indices) is tuple:
        return list(range(*indices))
    return list(indices)


def item_times(times, n: int):
    """A batch's ``times`` (see the module's docstring) as ``n`` (start, end) pairs of epoch
    seconds, one per value; None when the batch has none (or not ``n``)."""
    if not times:
        return None
    t = array("d")
    t.frombytes(times)
    if len(t) != n + 2:
        return None
    offset = t[0]
    return [(t[k] + offset, t[k + 1] + offset) for k in range(1, n + 1)]


def decode_batches(blob, host: str, starts: list) -> list:
    """``encode_batches``'s inverse: ``[(indices, values, errors, times)]``, ``indices`` as a range,
    list or None; ``starts``: each batch's first task id. A value or exception that cannot
    be unpickled here fails its own item with ``SerializationError``; a blob that cannot be
    read at all fails every item."""
    _local.failures = failures = []
    try:
        if type(blob) is list:  # a message that came in parts: read across them
            batches = pickle.load(io.BufferedReader(_PartsReader(blob), 1 << 20))
        else:
            batches = pickle.loads(blob)
    except Exception as e:
        from .errors import SerializationError

        err = SerializationError(
            f"cannot read a result message sent by {host}: {type(e).__name__}: {e}. The "
            "notebook and the workers may run different miniray versions.")
        return [(None, [], {-1: (err, "", None)}, None)] * len(starts)
    finally:
        _local.failures = None
    out = []
    for (indices, values, errors, times), start in zip(batches, starts):
        if type(indices) is tuple:
            indices = range(*indices)
        if failures and start is not None:
            _single_out(indices, values, errors, start, host)
        out.append((indices, values, errors, times))
    return out


def _single_out(indices, values, errors, start: int, host: str) -> None:
    """Turn the items whose value (or exception) could not be unpickled into errors."""
    positions = None
    for k, v in enumerate(values):
        bad = _find_failed(v)
        if bad is not None:
            if positions is None:
                positions = _positions(indices, len(values))
            i = positions[k]
            values[k] = None
            errors[i] = (_unpickling_error("result", i, start, host, bad.error), "", None)
    for i, (exc, tb, pid) in list(errors.items()):
        if type(exc) is _Failed:
            errors[i] = (_unpickling_error("exception", i, start, host, exc.error), tb, pid)


def _find_failed(v, depth: int = 0):
    """The ``_Failed`` in ``v`` (in builtin containers: the only place one can be), or None."""
    t = type(v)
    if t is _Failed:
        return v
    if depth < 64:
        if t is dict:
            for x in v.items():
                bad = _find_failed(x, depth + 1)
                if bad is not None:
                    return bad
        elif t is list or t is tuple or t is set or t is frozenset:
            for x in v:
                bad = _find_failed(x, depth + 1)
                if bad is not None:
                    return bad
    return None


def _unpickling_error(what: str, i: int, start: int, host: str, e: BaseException):
    from .errors import SerializationError

    item = "every item left" if i < 0 else f"item {i}"
    task = f"task {start}" if i < 0 else f"task {start + i}"
    return SerializationError(
        f"cannot unpickle the {what} of {item} ({task}) sent by {host}: "
        f"{type(e).__name__}: {e}. Is its type importable here? Install (or put on "
        "sys.path) the module that defines it, in the notebook as on the workers.")


class _PartsReader(io.RawIOBase):
    """The parts of a message read as one stream (no join: a big value is copied once,
    into itself)."""

    def __init__(self, parts: list):
        self.parts, self.i, self.at = [memoryview(p).cast("B") for p in parts], 0, 0

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        while self.i < len(self.parts):
            part = self.parts[self.i]
            n = min(len(b), part.nbytes - self.at)
            if n > 0:
                b[:n] = part[self.at : self.at + n]
                self.at += n
                return n
            self.i, self.at = self.i + 1, 0
        return 0
