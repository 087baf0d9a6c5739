"""A job's spec (``job:{job}`` field ``spec``) read defensively, and what a worker says when
a job's data in Redis cannot be used.

What a worker finds in Redis was written by a client of any version, by hand, or damaged:
it is checked before anything acts on it, and what fails the check fails that job's tasks
with an error that says so (never the worker). Keys a newer client adds are kept and
ignored.
"""

from __future__ import annotations

import json

from miniray.errors import MinirayError, SerializationError
from miniray.keys import Keys
from miniray.protocol import decode_chunk

__all__ = ["parse_spec", "chunk_head", "malformed", "bad_payload"]

_LIKELY = ("It was likely written by another miniray version (install the same version on "
           "the notebook and the workers) or corrupted in Redis; submit the job again.")


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _whole(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# field -> (check, what it must be); None is always allowed (no limit)
_FIELDS = {
    "timeout": (lambda v: _number(v) and v > 0, "a number of seconds > 0"),
    "memory_bytes": (lambda v: _whole(v) and v > 0, "a whole number of bytes > 0"),
    "cpus": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "gpus": (lambda v: _whole(v) and v >= 0, "a whole number >= 0"),
    "gpu_mem": (lambda v: _whole(v) and v >= 0, "a whole number of MiB >= 0"),
    "triton": (lambda v: isinstance(v, bool), "true or false"),
    "keep_children": (lambda v: isinstance(v, bool), "true or false"),
    "env": (lambda v: isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str)
                                                  for k, x in v.items()),
            "an object of strings"),
    "init": (lambda v: isinstance(v, str) and len(v) == 64
             and all(c in "0123456789abcdef" for c in v), "a sha256 in hex"),
    "inbox": (lambda v: isinstance(v, str), "a string"),
    "shm": (lambda v: isinstance(v, str), "a string"),
    "shm_min": (lambda v: _whole(v) and v > 0, "a whole number > 0"),
}


def malformed(job: str, what: str) -> MinirayError:
    return MinirayError(f"job {job} is malformed in Redis: {what}. {_LIKELY}")


def bad_payload(job: str, what: str, e: BaseException) -> SerializationError:
    err = SerializationError(
        f"job {job}: {what} in Redis cannot be unpickled ({type(e).__name__}: {e}). {_LIKELY}")
    err.__cause__ = e
    return err


def parse_spec(raw, job: str) -> dict:
    """The spec as a dict; ``MinirayError`` naming the bad field when it cannot be used."""
    if not raw:
        return {}
    try:
        spec = json.loads(raw)
    except (ValueError, TypeError) as e:  # (UnicodeDecodeError is a ValueError)
        raise malformed(job, f"its spec is not JSON ({e})") from None
    if not isinstance(spec, dict):
        raise malformed(job, f"its spec is a JSON {type(spec).__name__}, not an object")
    for name, (ok, must) in _FIELDS.items():
        v = spec.get(name)
        if v is not None and not ok(v):
            raise malformed(job, f"its spec's {name!r} is {_short(v)}, which must be {must}")
    return spec


def chunk_head(job: str, entry: str, chunk, fields: list) -> tuple:
    """``decode_chunk(fields)`` (the chunk's head and frames), checked against the chunk's
    queue entry; a ``MinirayError`` that says what is wrong otherwise."""
    try:
        head, frames = decode_chunk(fields)
    except MinirayError:  # another protocol version: its own message
        raise
    except Exception as e:
        raise malformed(job, f"the payload of its chunk {chunk} has no valid head ({e})") \
            from None
    items = Keys.parse_entry(entry)[2]
    if head.count != items:
        raise malformed(job, f"the payload of its chunk {chunk} holds {head.count} item(s), "
                        f"its queue entry {items}")
    return head, frames


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, str) else repr(v)
    return text if len(text) <= 60 else text[:57] + "..."
