"""Cached map items: ``Executor.map(..., cache=True)`` and ``map_futures(..., cache=True)``
keep each item's successful result on the cluster and do not run an item whose result is
already there for the same function and the same argument.

::

    items --[arg keys; one MGET per batch]--> hits: futures settled here (``cached`` True)
          \\--> misses: run as a plain map --> results --[writer thread: cache_store script]-->
                                                                       cache:{fn}:{arg}

The function's key is the sha256 of the function as cloudpickle pickles it (by value for
notebook cells, lambdas and closures: its code and every value it captures; code file names
are left out, so a cell re-run with the same text has the same key), plus, for a function
pickled by reference (importable from an installed module), its own bytecode. An argument's
key is the sha256 of its pickle. A key is only used when two pickles of the same object
agree; a function or argument that cannot be pickled, or whose pickle differs between two
dumps, is simply run (never cached): a miss costs a run, a false hit would be a wrong result.

Only successful results are cached, never exceptions. The client writes them: a background
thread (one per server and namespace in this process) pickles each result as it arrives and
stores a batch with one script (``broker.cache_store``) that keeps the TTL, the size
accounting and the eviction of the oldest entries exact under concurrent writers. A write
never fails a map: a result that cannot be pickled or is too big is skipped, a lost server
drops the batch. If the client dies before writing (a killed kernel), those results are
simply not cached and a later map runs them again. A lookup first waits (bounded) for this
process's own pending writes, so a map right after another finds its results.
``Executor.map`` caches the results as they are read; ``map_futures`` as they arrive.
"""

from __future__ import annotations

import atexit
import collections
import hashlib
import pickle
import threading
import time

import cloudpickle

from miniray.broker import Broker, connect
from miniray.config import settings
from miniray.errors import ServerError
from miniray.keys import Keys
from miniray.resp import RedisError
from miniray.serialization import _is_plain

from . import keep as _kept

__all__ = ["function_key", "argument_key", "ItemCache", "map", "map_futures", "clear", "stats"]

_BATCH = 1024  # items looked up per round trip
_WRITE_BATCH_BYTES = 8 << 20  # results stored per script call, at most (one at least)
_ENTRY_MAX = 256 << 20  # a result larger than this is never cached (nor above the cap)
_LOOKUP_SECONDS = 10.0  # a lookup the server does not answer in time: every item runs
_FLUSH_SECONDS = 5.0  # the most a lookup or a shutdown waits for this process's writes
_WRITE_SECONDS = 30.0  # a store the server does not answer in time is dropped

_caches: dict = {}
_caches_lock = threading.Lock()


def _same_twice(dump, obj) -> bytes | None:
    """``dump(obj)`` if two dumps agree (a deterministic pickle), else None."""
    try:
        a = dump(obj)
        if dump(obj) != a:
            return None
    except Exception:
        return None
    return a


def _cp(obj) -> bytes:
    return cloudpickle.dumps(obj, protocol=5)  # (cloudpickle's own: file names left out)


def function_key(fn) -> str | None:
    """The cache key of ``fn``: its pickle's sha256 (captured values included), plus its
    bytecode when it is pickled by reference; None when it has no deterministic pickle."""
    data = _same_twice(_cp, fn)
    if data is None:
        return None
    h = hashlib.sha256(data)
    code = getattr(fn, "__code__", None)
    by_ref = getattr(cloudpickle.cloudpickle, "_should_pickle_by_reference", None)
    try:
        if code is not None and (by_ref is None or by_ref(fn)):
            h.update(_code_bytes(code))
    except Exception:
        return None
    return h.hexdigest()


def _code_bytes(code) -> bytes:
    """A code object's bytecode, names and constants, nested code included (no addresses,
    no file name)."""
    parts = [code.co_code, repr(code.co_names).encode()]
    for const in code.co_consts:
        if hasattr(const, "co_code"):
            parts.append(_code_bytes(const))
        else:
            parts.append(repr(const).encode())
    return b"\0".join(parts)


def argument_key(kind: str, item) -> str | None:
    """The cache key of one item (``kind``: "m1", one argument; "m", an argument tuple), or
    None when it has no deterministic pickle (it then simply runs)."""
    if _is_plain((item,)):  # builtin scalars: the C pickler, deterministic
        data = pickle.dumps((kind, item), protocol=5)
    else:
        data = _same_twice(_cp, (kind, item))
        if data is None:
            return None
    return hashlib.sha256(data).hexdigest()


class ItemCache:
    """The item cache of one server and namespace, as this process uses it: lookups and a
    writer thread (see the module docstring). ``for_url`` gives the shared one."""

    def __init__(self, url: str, namespace: str):
        self.url, self.namespace = url, namespace
        self.keys = Keys(namespace)
        self._lock = threading.Lock()  # the lookup connection
        self._r = None
        self._cond = threading.Condition()
        self._queue: collections.deque = collections.deque()  # (member, value)
        self._busy = False  # the writer holds a batch
        self._thread: threading.Thread | None = None
        self._w = None  # the writer's connection and broker
        self.stored = self.skipped = 0

    @classmethod
    def for_url(cls, url: str, namespace: str) -> "ItemCache":
        with _caches_lock:
            cache = _caches.get((url, namespace))
            if cache is None:
                cache = _caches[(url, namespace)] = cls(url, namespace)
            return cache

    # -- lookups ---------------------------------------------------------------------------
    def lookup(self, fn_key: str, arg_keys: list) -> dict:
        """``{index: value}`` of the items whose result is cached (None keys are skipped);
        one round trip per batch. A server that does not answer in time, or a value that
        cannot be unpickled here, is a miss: that item runs."""
        self.flush(_FLUSH_SECONDS)
        ask = [(i, k) for i, k in enumerate(arg_keys) if k is not None]
        found: dict = {}
        with self._lock:
            for b in range(0, len(ask), _BATCH):
                batch = ask[b:b + _BATCH]
                try:
                    if self._r is not None and self._r.owed:
                        self._drop_connection()  # (never read another lookup's reply)
                    if self._r is None:
                        self._r = _connect_within(self.url, _LOOKUP_SECONDS)
                        if self._r is None:
                            break  # a server that does not answer: every item runs
                    self._r.send_command("MGET", *[self.keys.cache(fn_key, k) for _, k in batch])
                    replies = self._r.read_reply(_LOOKUP_SECONDS)
                except (RedisError, ServerError):
                    self._drop_connection()
                    break
                except BaseException:  # Ctrl-C: its reply must not answer the next lookup
                    self._drop_connection()
                    raise
                if isinstance(replies, Exception):
                    break
                for (i, _), raw in zip(batch, replies):
                    if raw is not None:
                        try:
                            found[i] = pickle.loads(raw)
                        except Exception:
                            pass
        return found

    def _drop_connection(self) -> None:
        r, self._r = self._r, None
        if r is not None:
            r.close()  # (a reply still owed goes with it)

    # -- writes ----------------------------------------------------------------------------
    def put(self, fn_key: str, arg_key: str, value) -> None:
        """Cache ``value`` as the result of (``fn_key``, ``arg_key``), off the caller's path."""
        with self._cond:
            self._queue.append((f"{fn_key}:{arg_key}", value))
            if self._thread is None:
                self._thread = threading.Thread(target=self._write_loop, daemon=True,
                                                name="miniray-cache-writer")
                self._thread.start()
            self._cond.notify_all()

    def put_future(self, fn_key: str, arg_key: str, fut) -> None:
        """A done-callback: cache the future's result if it succeeded."""
        if fut.cancelled() or fut.exception() is not None:
            return
        self.put(fn_key, arg_key, fut.result())

    def flush(self, timeout: float = _FLUSH_SECONDS) -> bool:
        """Wait (at most ``timeout`` s) until this process's pending writes have landed."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._queue or self._busy:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
        return True

    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._queue:
                    self._cond.wait()
                self._busy = True
            s = settings()
            cap = min(s.cache_max_bytes, _ENTRY_MAX)
            batch, size = [], 0
            # pickled here, not holding the lock: the results thread queues the next ones
            while size < _WRITE_BATCH_BYTES:
                with self._cond:
                    if not self._queue:
                        break
                    member, value = self._queue.popleft()
                try:
                    data = _cp(value)
                except Exception:  # a result that cannot be pickled here: not cached
                    self.skipped += 1
                    continue
                finally:
                    del value
                if len(data) > cap:
                    self.skipped += 1
                    continue
                batch.append((member, data))
                size += len(data)
            try:
                if batch:
                    self._store(batch, s.cache_ttl_seconds, s.cache_max_bytes)
                    self.stored += len(batch)
            except Exception:  # never fails a map: these results are simply not cached
                self.skipped += len(batch)
                w, self._w = self._w, None
                if w is not None:
                    w[0].close()
            finally:
                with self._cond:
                    self._busy = False
                    self._cond.notify_all()

    def _store(self, batch: list, ttl: int, cap: int) -> None:
        if self._w is None:
            r = connect(self.url)
            self._w = (r, Broker(r, self.namespace))
        r, broker = self._w
        args = [broker.ns, max(1, ttl), cap]
        for member, data in batch:
            args += (member, data)
        for attempt in (0, 1):
            r.send_command("EVALSHA", Broker._SHAS["cache_store"], 0, *args)
            reply = r.read_reply(_WRITE_SECONDS)
            if isinstance(reply, Exception):
                if attempt == 0 and "NOSCRIPT" in str(reply):  # the server restarted
                    broker.load_scripts()
                    continue
                raise reply
            return


def _connect_within(url: str, timeout: float):
    """A connection to ``url``, or None if the server has not answered in ``timeout`` s
    (connecting waits for its AUTH and PING replies without a bound: a thread of its own
    does, and closes what it got if nobody waits for it any more)."""
    box: list = []
    lock = threading.Lock()

    def attempt():
        try:
            conn = connect(url)
        except Exception:
            return
        with lock:
            box.append(conn)

    t = threading.Thread(target=attempt, daemon=True, name="miniray-cache-connect")
    t.start()
    t.join(timeout)
    with lock:
        box.append(None)  # (a late connection lands after this mark and is closed)
    if box[0] is None:
        def close_late():
            t.join()
            with lock:
                for conn in box[1:]:
                    if conn is not None:
                        conn.close()
        threading.Thread(target=close_late, daemon=True).start()
        return None
    return box[0]


def _item_cache(ex) -> ItemCache:
    return ItemCache.for_url(ex.redis_url, ex._settings.namespace)


def _cached_future(ex, value):
    from .futures import MinirayFuture

    f = MinirayFuture(None, None)
    f.job, f.cached = ex.job_id, True
    f.set_result(value)
    return f


def _plan(ex, fn, kind: str, items: list):
    """(function key, argument keys, cached values by index) for a map over ``items``."""
    ex._outbox.function(fn, fresh=True)  # what travels is pickled now, as the key is
    fkey = function_key(fn)
    if fkey is None or not items or settings().cache_max_bytes <= 0:
        return fkey, [None] * len(items), {}
    akeys = [argument_key(kind, x) for x in items]
    return fkey, akeys, _item_cache(ex).lookup(fkey, akeys)


def map_futures(ex, fn, iterables: tuple, chunksize: int) -> list:
    """``Executor.map_futures(..., cache=True)``: a cached item's future is settled at once
    (its ``cached`` is True, ``task_id`` None); the others run as a plain ``map_futures``
    and are cached as they succeed."""
    if len(iterables) == 1:
        kind, items = "m1", list(iterables[0])
    else:
        kind, items = "m", list(zip(*iterables))
    fkey, akeys, hits = _plan(ex, fn, kind, items)
    misses = [i for i in range(len(items)) if i not in hits]
    first = ex._next_task  # (this map's first task id: where a kept job's record goes)
    run = []
    if misses:
        columns = ([[items[i] for i in misses]] if kind == "m1"
                   else [list(c) for c in zip(*(items[i] for i in misses))])
        run = ex.map_futures(fn, *columns, chunksize=chunksize)
    if hits and ex._keep is not None:  # attachers place the cached items too (miniray.client.keep)
        _kept.note_cached(ex, first, len(items), {i: f"{fkey}:{akeys[i]}" for i in hits},
                          [f.task_id for f in run])
    out: list = [None] * len(items)
    for i, value in hits.items():
        out[i] = _cached_future(ex, value)
    cache = _item_cache(ex) if fkey is not None else None
    for i, f in zip(misses, run):
        out[i] = f
        if cache is not None and akeys[i] is not None:
            f.add_done_callback(lambda f, k=akeys[i]: cache.put_future(fkey, k, f))
    return out


def map(ex, fn, iterables: tuple, timeout, chunksize: int):
    """``Executor.map(..., cache=True)``: cached items come from the cache, the others run
    as a plain ``map`` (same order, errors, timeout and Ctrl-C); results are cached as they
    are read."""
    if len(iterables) == 1:
        kind, items = "m1", list(iterables[0])
    else:
        kind, items = "m", list(zip(*iterables))
    fkey, akeys, hits = _plan(ex, fn, kind, items)
    misses = [items[i] for i in range(len(items)) if i not in hits]
    if not misses:
        rest = iter(())
    elif kind == "m1":
        rest = ex.map(fn, misses, timeout=timeout, chunksize=chunksize)
    else:
        rest = ex.map(fn, *[list(col) for col in zip(*misses)], timeout=timeout,
                      chunksize=chunksize)
    cache = _item_cache(ex) if fkey is not None else None
    return _merged(len(items), hits, rest, cache, fkey, akeys)


def _merged(n: int, hits: dict, rest, cache, fkey, akeys):
    try:
        for i in range(n):
            if i in hits:
                yield hits.pop(i)
                continue
            value = next(rest)
            if cache is not None and akeys[i] is not None:
                cache.put(fkey, akeys[i], value)
            yield value
    finally:
        close = getattr(rest, "close", None)
        if close is not None:
            close()  # (the plain map's own cleanup: what is pending is cancelled)


def flush_for(ex, timeout: float = _FLUSH_SECONDS) -> None:
    """Let this process's pending cache writes to ``ex``'s server land (bounded)."""
    cache = _caches.get((ex.redis_url, ex._settings.namespace))
    if cache is not None:
        cache.flush(timeout)


def _url(redis_url: str | None) -> str:
    url = redis_url or settings().redis_url
    if url is None:
        from miniray.cluster.local import get_local_cluster

        url = get_local_cluster().url
    return url


def clear(redis_url: str | None = None) -> int:
    """Empty the item cache of a cluster (``redis_url``; None: ``MINIRAY_REDIS_URL``, else
    this process's local cluster); returns how many entries it had.

    >>> miniray.cache.clear()            # doctest: +SKIP
    42
    """
    url = _url(redis_url)
    ns = settings().namespace
    cache = _caches.get((url, ns))
    if cache is not None:
        cache.flush()  # (a write still on its way would outlive the clear)
    r = connect(url)
    try:
        return int(Broker(r, ns).cache_clear())
    finally:
        r.close()


def stats(redis_url: str | None = None) -> dict:
    """``{"entries": n, "bytes": total}`` of a cluster's item cache."""
    url = _url(redis_url)
    k = Keys(settings().namespace)
    r = connect(url)
    try:
        n, total = r.pipeline_raw([("ZCARD", k.cache_index), ("GET", k.cache_bytes)])
    finally:
        r.close()
    return {"entries": int(n), "bytes": int(total or 0)}


@atexit.register
def _flush_all() -> None:
    deadline = time.monotonic() + _FLUSH_SECONDS
    for cache in list(_caches.values()):
        cache.flush(max(0.0, deadline - time.monotonic()))
