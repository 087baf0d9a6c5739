"""The broker's Python side: ``Broker`` binds the Lua scripts to one connection and namespace
and calls them by hash; ``connect`` makes a checked connection; ``parse_claim`` and ``job_ttl``
read and size what the scripts use.
"""

from __future__ import annotations

import hashlib
import json
import time

from miniray.errors import ConfigurationError, ServerError
from miniray.keys import Keys
from miniray.resp import Connection, NoScriptError, RedisError, ReplyError, redact

from .lua_cache import CACHE_CLEAR, CACHE_STORE
from .lua_client import (
    CANCEL_CHUNK,
    CANCEL_JOB,
    PUBLISH,
    PUBLISH_ONE,
    SEAL,
    STOP_CHUNKS,
)
from .lua_liveness import HEARTBEAT, REAP, RELEASE
from .lua_worker import CLAIM, COMPLETE, IDLE

__all__ = ["HAND_LEN", "Broker", "connect", "job_ttl", "parse_claim"]

HAND_LEN = 4  # list elements of a chunk handed to a slot: job, spec, entry, frame (publish_one)


def job_ttl(grace: float) -> int:
    """Seconds an open job's keys live unless its executor renews them: a minute past the
    client's grace (``MINIRAY_CLIENT_GRACE_SECONDS``)."""
    return max(1, round(grace)) + 60


def parse_claim(claimed: list) -> tuple:
    """A claim script's reply as ``(job, spec bytes, [(entry, chunk id, frames)])``."""
    job, spec, out, i = claimed[0].decode(), claimed[1], [], 2
    while i < len(claimed):
        entry = claimed[i].decode()
        chunk_id, nframes, _ = Keys.parse_entry(entry)
        out.append((entry, chunk_id, claimed[i + 1 : i + 1 + nframes]))
        i += 1 + nframes
    return job, spec, out


def connect(url: str) -> Connection:
    """A connection to ``url`` (``redis://`` or ``unix://``), checked with PING."""
    try:
        client = Connection(url)
    except ValueError as e:
        raise ConfigurationError(
            f"cannot use the Redis URL {redact(url)!r}: {e}. Give redis://:PASSWORD@HOST:PORT "
            "or unix:///path/to/socket?password=PASSWORD"
        ) from None
    try:
        client.ping()
    except ReplyError as e:
        raise ServerError(
            f"the server at {redact(url)} refused us: {e}. Check the password in the URL "
            "(MINIRAY_REDIS_URL or redis_url=...)"
        ) from None
    except RedisError as e:
        err = ServerError(
            f"cannot reach the server at {redact(url)}: {e}. Is it running? Leave the address "
            "unset to start a private local cluster instead."
        )
        err.unreachable = True
        raise err from None
    return client


class Broker:
    """The scripts bound to one Redis client and namespace.

    Scripts are loaded once (SCRIPT LOAD) and then called by hash: redis-py's own Script
    objects would send a SCRIPT EXISTS before every pipeline, a round trip per hop.
    """

    _SOURCES = {"publish": PUBLISH, "publish_one": PUBLISH_ONE, "claim": CLAIM,
                "idle": IDLE, "complete": COMPLETE,
                "cancel_chunk": CANCEL_CHUNK, "stop_chunks": STOP_CHUNKS,
                "cancel_job": CANCEL_JOB, "seal": SEAL,
                "heartbeat": HEARTBEAT, "reap": REAP, "release": RELEASE,
                "cache_store": CACHE_STORE, "cache_clear": CACHE_CLEAR}
    _SHAS: dict = {}

    def __init__(self, client: Connection, namespace: str = "miniray", load: bool = True):
        """``load=False``: trust that the scripts are on the server (a task process, whose
        worker loaded them); a caller that gets NoScriptError calls ``load_scripts``."""
        self.r = client
        self.keys = Keys(namespace)
        self.ns = namespace
        if load:
            self.load_scripts()
        elif not Broker._SHAS:
            Broker._SHAS.update({name: hashlib.sha1(src.encode()).hexdigest()
                                 for name, src in self._SOURCES.items()})

    def load_scripts(self) -> None:
        pipe = self.r.pipeline()
        for src in self._SOURCES.values():
            pipe.command("SCRIPT", "LOAD", src)
        for name, sha in zip(self._SOURCES, pipe.execute()):
            Broker._SHAS[name] = sha.decode() if isinstance(sha, bytes) else sha

    def _run(self, name: str, args: list, pipe=None):
        """Run script ``name``; queued on ``pipe`` when given, else at once (reloading the
        scripts once if the server lost them, e.g. after a restart)."""
        if pipe is not None:
            return pipe.command("EVALSHA", self._SHAS[name], 0, *args)
        try:
            return self.r.execute("EVALSHA", self._SHAS[name], 0, *args)
        except NoScriptError:
            self.load_scripts()
            return self.r.execute("EVALSHA", self._SHAS[name], 0, *args)

    # -- executor side -------------------------------------------------------------------
    def create_job(self, pipe, job: str, client: str, name: str, priority: int, spec: dict,
                   requirements: dict, created: float, grace: float = 600.0,
                   keep: float | None = None) -> None:
        """A new open job. ``grace``: how long the cluster keeps it, and its client's unread
        results, while it hears nothing from the client (see ``client:{client}``); ``keep``:
        a kept job's grace instead (it is not given up, see ``miniray.client.keep``)."""
        k = self.keys
        fields = {
            "client": client, "name": name, "priority": priority, "state": "open",
            "created": created, "spec": json.dumps(spec), "queued": 0, "running": 0,
            "done": 0, "failed": 0, "cancelled": 0, "grace": max(1, round(grace)),
            **requirements,
        }
        if keep is not None:
            fields["keep"] = max(1, round(keep))
        pipe.command("HSET", k.job(job), *[x for kv in fields.items() for x in kv])
        # renewed by the executor while it lives; outlives the client key, so that a claim
        # finds the job of a silent client and gives it up
        pipe.command("EXPIRE", k.job(job), job_ttl(grace if keep is None else keep))
        pipe.command("ZADD", k.jobs_all, created, job)
        pipe.command("ZREMRANGEBYRANK", k.jobs_all, 0, -1001)  # the newest 1000 jobs

    def publish(self, pipe, job: str, priority: int, n_chunks: int, n_items: int,
                maxlen: int) -> None:
        self._run("publish", [self.ns, job, priority, n_chunks, n_items, maxlen], pipe)

    def publish_one(self, pipe, job: str, priority: int, entry: str, payload,
                    maxlen: int) -> None:
        """Store and publish one chunk of one frame, handed to a waiting slot when one can
        run it (see PUBLISH_ONE in lua_client)."""
        self._run("publish_one", [self.ns, job, priority, entry, payload, maxlen], pipe)

    def cancel_chunk(self, job: str, entry: str) -> bool:
        return bool(self._run("cancel_chunk", [self.ns, job, entry]))

    def stop_chunks(self, job: str, entries: list, maxlen: int = 10000) -> set:
        """Stop these chunks of the open ``job``: queued ones are withdrawn, those a worker
        holds are interrupted (or dropped unstarted) by it once its heartbeat hears of them;
        their items count as cancelled. Returns the chunk ids stopped or withdrawn (not those
        that had finished)."""
        if not entries:
            return set()
        return {int(c) for c in self._run("stop_chunks", [self.ns, job, maxlen, *entries])}

    def cancel_job(self, job: str, state: str = "cancelled", maxlen: int = 10000,
                   pipe=None) -> list:
        """Close ``job`` (``state``), dropping its queued chunks; returns their entries (none
        when queued on ``pipe``)."""
        args = [self.ns, job, state, maxlen]
        if pipe is not None:
            self._run("cancel_job", args, pipe)
            return []
        return [e.decode() for e in self._run("cancel_job", args) or []]

    def cache_store(self, ttl: int, max_bytes: int, entries: list) -> int:
        """Store cached item results, ``entries`` [(member ``"<fn>:<arg>"``, pickled value)],
        each kept ``ttl`` s, evicting the oldest while they pass ``max_bytes`` in all;
        returns how many were evicted (see miniray.cache)."""
        args = [self.ns, ttl, max_bytes]
        for member, value in entries:
            args += (member, value)
        return self._run("cache_store", args)

    def cache_clear(self) -> int:
        """Empty the item cache; returns how many entries it had."""
        return self._run("cache_clear", [self.ns])

    def seal(self, job: str, total: int, maxlen: int = 10000) -> bool:
        """A kept job takes no more items (``total`` in all); False when it is not open."""
        return bool(self._run("seal", [self.ns, job, total, maxlen]))

    # -- worker side ---------------------------------------------------------------------
    def claim(self, worker: str, max_chunks: int, name: str, host: str, free_gpus: int,
              cpus: int, pipe=None, gpu_free_mb=(), triton: bool = False, slot: int = 0,
              maxlen: int = 10000, register: bool = False, known: str = ""):
        """Take up to ``max_chunks`` chunks of the best job this worker can run now (and
        record their "started" event, ``maxlen`` bounding the job's event stream). With
        ``register``, a slot that finds nothing is registered as idle in the same step, so
        the next work published wakes it (the newest registration first). ``known``:
        ``",job=n,..."``, how many chunks of each job to take at most; one of any other job
        ("": ``max_chunks`` of any job)."""
        return self._run("claim", [self.ns, worker, max_chunks, name, host, free_gpus, cpus,
                                   ",".join(map(str, gpu_free_mb)) if gpu_free_mb else "",
                                   "1" if triton else "0", slot, maxlen,
                                   repr(time.time()) if register else "", known], pipe)

    def idle(self, pipe, waiter: str) -> None:
        """A slot about to wait: wake itself if work is queued, else register as idle."""
        self._run("idle", [self.ns, waiter, repr(time.time())], pipe)

    def complete(self, pipe, worker: str, job: str, chunks: list, ttl: int, maxlen: int,
                 msg: list, idle: str = "") -> None:
        """Report finished items: ``chunks`` is [(entry, n_done, n_failed, final)]; ``msg``
        (the elements of one result message, see ``protocol.encode_result``) goes to the
        client's results ([]: it went there past the server, see ``miniray.values.inbox``). With
        ``idle`` (a waiter) that slot then goes idle, as ``idle`` would have it."""
        args = [self.ns, worker, job, ttl, maxlen, len(msg), idle,
                repr(time.time()) if idle else "", *msg]
        for entry, n_done, n_failed, final in chunks:
            args += [entry, n_done, n_failed, int(final)]
        self._run("complete", args, pipe)

    def heartbeat(self, worker: str, info: dict, ttl: int, jobs=(), pipe=None,
                  stall: float | None = None, rejoin: bool = False):
        """Record a worker's heartbeat (``info``, kept ``ttl`` s); returns the server's time,
        which of ``jobs`` are no longer open, then ``b"job/chunk"`` for each chunk of the others
        that its client stopped (see ``stop_chunks``). A gap over ``stall`` seconds since anyone's
        last heartbeat or reap is taken for a stopped server (see ``tick`` in the scripts):
        by default half the dead timeout, which ``ttl`` is three times. ``rejoin``: the worker
        has heartbeaten before, so if it is not registered it was reaped while it lived, and
        its idle slots are woken to register again."""
        if stall is None:
            stall = ttl / 6
        return self._run("heartbeat", [self.ns, worker, json.dumps(info), ttl, stall,
                                       "1" if rejoin else "0", *jobs], pipe)

    def reap(self, dead_after: float, max_retries: int, maxlen: int, ttl: int, pipe=None):
        return self._run("reap", [self.ns, dead_after, max_retries, maxlen, ttl], pipe)

    def release(self, worker: str) -> int:
        return self._run("release", [self.ns, worker])
