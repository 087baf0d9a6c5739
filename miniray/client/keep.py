"""Kept jobs (``Executor(keep=True)``): the executor's side of jobs that outlive their client.

A kept job is not given up when its client goes silent: it runs on for
``MINIRAY_KEEP_GRACE_SECONDS`` and its results are stored on the cluster, one ``out:{job}``
stream entry per result message, for its client and for any number of attachers
(``miniray.attach``). Its client gets a pointer (``b"P" job "|" entry id``) in ``res:{client}``
and reads the entry (no second copy of the result on the server); ``idx:{job}`` maps each
chunk to its first task id and item count, written when the chunk is sent, so an attacher can
place every item. Once its client has sealed it (``Executor.seal()``: no more submissions),
the server's scripts end it (``done``) when every item has ended, whether the client lives or
not. Plain executors pay none of this.

A kept ``map_futures(..., cache=True)`` whose items were partly found in the item cache
(``miniray.cache``) runs only the others: its ``idx:{job}`` gets a record, field
``cached:<first task id>``, JSON ``{"n": items, "hits": {position: cache member}, "tasks":
[task id of each other item, in position order]}``, so that an attacher places every item
(the cached ones read from the cache, by their member).
"""

from __future__ import annotations

import time

from miniray.keys import Keys
from miniray.protocol import Assembler

__all__ = ["LINGER_SECONDS", "fetch", "resolve", "index", "renew", "linger", "note_cached",
           "CACHED_PREFIX"]

CACHED_PREFIX = "cached:"  # an idx:{job} field that is a cached map's record, not a chunk

#: how long a kept job's stored results stay once its live client has collected them all
#: (attachers that follow it live read them meanwhile)
LINGER_SECONDS = 60
FETCH_SECONDS = 5.0  # the longest wait for a stored result's reply (see fetch)


def index(pipe, keys: Keys, job: str, refs) -> None:
    """Record where each chunk's items go (``idx:{job}``), in the pipeline that sends them."""
    fields = []
    for ref in refs:
        fields += (ref.chunk, f"{ref.start}:{ref.count}")
    if fields:
        pipe.command("HSET", keys.index(job), *fields)


def note_cached(ex, first: int, n: int, hits: dict, tasks: list) -> None:
    """Record a kept map's cached items in ``idx:{job}`` (see the module docstring), before
    the map is sealed; the map's other items are tasks ``tasks`` (in position order)."""
    import json

    from miniray.broker import connect

    record = json.dumps({"n": n, "hits": hits, "tasks": tasks}, separators=(",", ":"))
    conn = connect(ex.redis_url)  # (the executor's own connection is its flusher's)
    try:
        conn.execute("HSET", ex.keys.index(ex.job_id), f"{CACHED_PREFIX}{first}", record)
    finally:
        conn.close()


def renew(pipe, keys: Keys, job: str, ttl: int) -> None:
    """While its client lives, a kept job's own keys live (they expire ``ttl`` s after it
    died)."""
    for key in (keys.out(job), keys.index(job), keys.queue(job), keys.tasks(job)):
        pipe.command("EXPIRE", key, ttl)


def linger(pipe, keys: Keys, job: str) -> None:
    """Its client collected every result: the stored copies go in ``LINGER_SECONDS`` (and
    the job is ``collected``: a persistent cluster's idle stop waits for nobody)."""
    pipe.command("HSET", keys.job(job), "collected", repr(time.time()))
    for key in (keys.out(job), keys.index(job)):
        pipe.command("EXPIRE", key, LINGER_SECONDS)


def parts_of(entry_fields: list) -> list:
    """The elements of a result message from its ``out:{job}`` entry's field list."""
    return [entry_fields[i + 1] for i in range(0, len(entry_fields), 2)]


def assemble(parts: list):
    """One stored result message back together (``bytes``, or the parts of a big one)."""
    asm = Assembler()
    msg = None
    for p in parts:
        msg = asm.feed(p)
    return msg


def fetch(conn, keys: Keys, pointer: bytes):
    """The result message a pointer names (None when it is gone: the job expired). Waits at
    most ``FETCH_SECONDS`` for the server (one that hangs must not hold a reader past a
    caller's timeout for long): then the connection is closed, nothing left owed on it, and
    ``ReplyTimeout`` raised; the pointer stays undelivered, for the next read."""
    job, entry_id = bytes(pointer[1:]).decode().split("|", 1)
    conn.send_command("XRANGE", keys.out(job), entry_id, entry_id)
    try:
        got = conn.read_reply(FETCH_SECONDS)
    except BaseException:  # (ReplyTimeout, Ctrl-C: the reply would be read as another's)
        conn.close()
        raise
    if isinstance(got, Exception):
        raise got
    if not got:
        return None
    return assemble(parts_of(got[0][1]))


def resolve(conn, keys: Keys, msgs: list) -> list:
    """A kept job's client's popped messages with every pointer replaced by the elements of
    the message it names, read in one round trip (``res:{client}`` of a kept job holds
    pointers, lost-chunk notes and wake-ups: never the parts of a message). Bounded as
    ``fetch``; a pointer whose entry is gone is dropped."""
    wanted = [i for i, m in enumerate(msgs) if m[:1] == b"P"]
    if not wanted:
        return msgs
    cmds = []
    for i in wanted:
        job, entry_id = bytes(msgs[i][1:]).decode().split("|", 1)
        cmds.append(("XRANGE", keys.out(job), entry_id, entry_id))
    conn.send_deferred(cmds)
    try:
        replies = [conn.read_reply(FETCH_SECONDS) for _ in cmds]
    except BaseException:
        conn.close()  # (nothing may stay owed: see fetch)
        raise
    found = {}
    for i, got in zip(wanted, replies):
        if isinstance(got, Exception):
            raise got
        found[i] = parts_of(got[0][1]) if got else []
    out = []
    for i, m in enumerate(msgs):
        if i in found:
            out += found[i]
        else:
            out.append(m)
    return out
