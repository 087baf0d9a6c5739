"""A chunk as a worker's slot holds it, and how its job's spec and payload head are read.

A ``Chunk`` is what the slot thread knows of a chunk its task process holds or will be sent:
where it is in Redis (job, queue entry, chunk id), the process's sequence number for it, what
its payload's head says (function, first item, item count), the job's spec, and which items
were delivered already (so a resend after a death skips them). A job whose data in Redis is
malformed gives chunks with ``bad`` set: they fail with that error instead of running.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from miniray.errors import JobCancelledError, MinirayError

from .jobspec import chunk_head, parse_spec

__all__ = ["Chunk", "spec_of", "decode_head", "cancelled_error"]


@dataclass
class Chunk:
    """A chunk held by a slot's task process, or waiting to be sent to it."""

    job: str
    entry: str
    chunk: int
    seq: int
    sha: str
    start: int
    count: int
    frames: list  # the pickle stream (head stripped) and its out-of-band buffers
    spec: dict  # the job's limits and env
    delivered: set = field(default_factory=set)
    bad: BaseException | None = None  # its job's data in Redis is malformed: it fails


def spec_of(job: str, raw) -> tuple:
    """(the job's spec, None), or ({}, the error its chunks fail with) when it is malformed."""
    try:
        return parse_spec(raw, job), None
    except MinirayError as e:
        return {}, e


def decode_head(c: Chunk, frames: list) -> bool:
    """Fill in the chunk from its payload's head; False (and ``c.bad``) when it has none."""
    try:
        head, c.frames = chunk_head(c.job, c.entry, c.chunk, frames)
    except MinirayError as e:  # another protocol version, or garbage
        c.bad = e
        return False
    c.sha, c.start, c.count = head.fn_sha, head.start, head.count
    return True


def cancelled_error(job: str) -> JobCancelledError:
    return JobCancelledError(f"job {job} was cancelled while this task was running")
