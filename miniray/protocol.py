"""The wire format between executors and workers, encoded and decoded only here.

A *chunk* is the unit that travels: one ``submit`` or ``chunksize`` items of a ``map``. Its
payload is a list of frames (stored as fields of ``tasks:{job}``)::

    frame 0   = CHUNK_HEAD (version, fn sha256, first task index, item count) + pickle stream
    frame 1.. = out-of-band pickle buffers (large arrays), never copied into frame 0

The fixed-size head lets a worker learn the function and the task range without unpickling
user data. A *result message* (list ``res:{client}``) is ``b"R"`` + u32 header length + pickled
:class:`ResultHeader` + a blob written by the task process: the pickled list of
``(indices, values, errors)`` batches, one per chunk in the header (``indices``: None, a list,
or ``(start, stop)``; see ``taskproc``). The reaper's Lua writes ``b"L" job "|" chunk "|"
worker`` for a chunk lost with its worker.
"""

from __future__ import annotations

import pickle
import struct
from dataclasses import dataclass
from typing import NamedTuple

__all__ = [
    "PROTOCOL_VERSION",
    "ChunkHead",
    "encode_chunk_head",
    "decode_chunk_head",
    "ResultHeader",
    "encode_result",
    "decode_message",
    "LostChunk",
]

PROTOCOL_VERSION = 2  # 2: contiguous result indices travel as (start, stop)
_HEAD = struct.Struct("!B32sQI")  # version, sha256 digest, first task index, item count
_U32 = struct.Struct("!I")


class ChunkHead(NamedTuple):  # a tuple: made for every chunk a worker takes
    fn_sha: str
    start: int
    count: int


def encode_chunk_head(fn_sha: str, start: int, count: int) -> bytes:
    return _HEAD.pack(PROTOCOL_VERSION, bytes.fromhex(fn_sha), start, count)


def decode_chunk_head(frame0) -> tuple[ChunkHead, memoryview]:
    """Split frame 0 into its head and the pickle stream (a view, not a copy)."""
    view = memoryview(frame0)
    version, digest, start, count = _HEAD.unpack_from(view)
    if version != PROTOCOL_VERSION:
        from .errors import MinirayError

        raise MinirayError(
            f"task encoded with protocol {version}, this worker speaks {PROTOCOL_VERSION}: "
            "the notebook and the workers run different miniray versions; install the same "
            "version on both"
        )
    return ChunkHead(digest.hex(), start, count), view[_HEAD.size :]


class ResultHeader(NamedTuple):  # a tuple: decoded for every result message
    worker: str
    host: str
    pid: int
    chunks: list  # [(chunk id, final)], one per batch in the blob


@dataclass(frozen=True)
class LostChunk:
    job: str
    chunk: int
    worker: str


def encode_result(header: ResultHeader, blob: bytes) -> bytes:
    head = pickle.dumps(tuple(header), protocol=5)
    return b"".join((b"R", _U32.pack(len(head)), head, blob))


def decode_message(msg: bytes):
    """Return ``(ResultHeader, blob view)`` or a :class:`LostChunk`."""
    tag = msg[:1]
    if tag == b"R":
        (n,) = _U32.unpack_from(msg, 1)
        header = ResultHeader._make(pickle.loads(msg[5 : 5 + n]))
        return header, memoryview(msg)[5 + n :]
    if tag == b"L":
        job, chunk, worker = msg[1:].decode().split("|", 2)
        return LostChunk(job, int(chunk), worker)
    raise ValueError(f"unknown result message tag {tag!r}")
