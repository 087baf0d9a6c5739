"""Ray-style actors: a class instance in its own process, its methods called through futures.

Built on ``miniray.channels``: the actor is a forked ``Worker`` (or a ``RemoteWorker`` whose
server runs ``miniray.channels.actors.actor_main``) speaking the pickle codec::

    caller threads --send (under lock, so ids are in call order)--> actor process
    reader thread  <--("ok"|"err", call id, value)----------------  one call at a time, in order

One reader thread per handle resolves the futures; if the channel breaks, every pending and
later call fails with ``ActorDiedError``.
"""

import itertools
import pickle
import threading
import traceback
from collections import deque
from concurrent.futures import FIRST_COMPLETED, Future, wait

import cloudpickle

from miniray.errors import ActorDiedError, ChannelError, RemoteTraceback

from .remote import RemoteWorker
from .worker import Worker

_INIT_ID = 0


def actor(cls, *args, where=None, **kwargs):
    """Start ``cls(*args, **kwargs)`` in a dedicated process and return its ``ActorHandle``.

    >>> counter = actor(Counter, start=10)          # doctest: +SKIP
    >>> counter.add(5).result()                     # doctest: +SKIP
    15

    ``where``: ``None`` forks a local process; a connected ``RemoteWorker`` (codec ``"pickle"``)
    or a ``"host:port"`` string uses a WorkerServer started with
    ``--work-fn miniray.channels.actors.actor_main``. An exception in ``__init__`` fails every call.
    """
    if where is None:
        channel = Worker(actor_main, codec="pickle")
    elif isinstance(where, str):
        host, _, port = where.rpartition(":")
        channel = RemoteWorker(host, int(port), codec="pickle")
    else:
        channel = where
    if getattr(channel, "codec", "pickle") != "pickle":
        raise ValueError(f"actors need a channel with codec='pickle', got {channel.codec!r}")
    return ActorHandle(channel, cls, args, kwargs)


class ActorHandle:
    """Proxy to an actor: ``handle.method(*a, **kw)`` returns a ``concurrent.futures.Future``."""

    def __init__(self, channel, cls, args, kwargs):
        self._channel = channel
        self._name = getattr(cls, "__qualname__", repr(cls))
        self._lock = threading.Lock()
        self._ids = itertools.count(_INIT_ID)
        self._pending = {}
        self._dead = None  # the ActorDiedError every later call fails with
        self._closing = False
        self.ready = self._submit("__init__", (cls, args, kwargs))  # done once constructed
        self._reader = threading.Thread(target=self._read_loop, daemon=True,
                                        name=f"actor-reader:{self._name}")
        self._reader.start()

    def __repr__(self):
        state = "dead" if self._dead else "alive"
        return f"<ActorHandle {self._name} pid={getattr(self._channel, 'pid', '?')} {state}>"

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        return _ActorMethod(self, name)

    @property
    def alive(self):
        return self._dead is None

    def _submit(self, method, payload):
        future = Future()
        with self._lock:
            if self._dead is not None:
                future.set_exception(self._dead)
                return future
            call_id = next(self._ids)
            self._pending[call_id] = future
            try:
                self._channel.send((method, call_id, payload))
            except ChannelError as e:
                self._pending.pop(call_id, None)
                future.set_exception(ActorDiedError(f"actor {self._name} is gone: {e}"))
            except Exception as e:  # arguments that cannot be pickled: only this call fails
                self._pending.pop(call_id, None)
                future.set_exception(e)
        return future

    def _read_loop(self):
        try:
            while True:
                status, call_id, value, tb = self._channel.recv()
                future = self._pending.pop(call_id, None)
                if status == "err":
                    value.__cause__ = RemoteTraceback(tb)
                    if call_id == _INIT_ID:
                        self._die(ActorDiedError(f"actor {self._name} failed in __init__: "
                                                 f"{type(value).__name__}: {value}"), value)
                    if future is not None:
                        future.set_exception(value)
                elif future is not None:
                    future.set_result(value)
        except Exception as e:  # noqa: BLE001 - any channel failure means the actor is gone
            if self._closing:
                self._die(ActorDiedError(f"actor {self._name} was closed"), None)
            else:
                self._die(ActorDiedError(f"actor {self._name} (pid "
                                         f"{getattr(self._channel, 'pid', '?')}) died: {e}; "
                                         "its pending calls cannot complete"), e)

    def _die(self, error, cause):
        error.__cause__ = cause
        with self._lock:
            if self._dead is None:
                self._dead = error
            pending, self._pending = self._pending, {}
        for future in pending.values():
            if not future.done():
                future.set_exception(self._dead)

    def close(self, timeout=5.0):
        """Stop the actor after the calls already sent; later calls fail with ActorDiedError."""
        self._closing = True
        with self._lock:
            if self._dead is None:
                try:
                    self._channel.send(("__close__", -1, None))
                except ChannelError:
                    pass
        self._reader.join(timeout)  # the reader ends when the actor closes the channel
        self._channel.close()  # a Worker that did not exit by now is killed
        self._die(ActorDiedError(f"actor {self._name} was closed"), None)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


class _ActorMethod:
    def __init__(self, handle, name):
        self._handle, self._name = handle, name

    def __call__(self, *args, **kwargs):
        return self._handle._submit(self._name, (args, kwargs))

    def __repr__(self):
        return f"<actor method {self._handle._name}.{self._name}>"


def actor_main(channel):
    """The actor process's loop (also a WorkerServer ``work_fn``:
    ``miniray.channels.actors.actor_main``)."""
    instance = None
    while True:
        method, call_id, payload = channel.recv()
        if method == "__close__":
            return
        try:
            if method == "__init__":
                cls, args, kwargs = payload
                instance = cls(*args, **kwargs)
                result = None
            else:
                args, kwargs = payload
                result = getattr(instance, method)(*args, **kwargs)
        except BaseException as e:  # noqa: BLE001 - reported to the caller, the actor lives on
            channel.send(("err", call_id, _portable(e), traceback.format_exc()))
            if method == "__init__":
                return
            continue
        try:
            channel.send(("ok", call_id, result, None))
        except ChannelError:
            raise
        except Exception as e:  # noqa: BLE001 - an unpicklable result is a failure, not a drop
            error = TypeError(f"result of {method}() could not be pickled: {e}")
            channel.send(("err", call_id, error, traceback.format_exc()))


def _portable(exc):
    """``exc`` if it survives a pickle round trip, else a RuntimeError that describes it."""
    try:
        pickle.loads(cloudpickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001
        return RuntimeError(f"{type(exc).__module__}.{type(exc).__qualname__}: {exc} "
                            "(the original exception could not be pickled)")


class ActorPool:
    """Spread calls over actors, one call in flight per actor (like ``ray.util.ActorPool``).

    >>> pool = ActorPool([actor(Model) for _ in range(4)])               # doctest: +SKIP
    >>> list(pool.map(lambda a, x: a.predict(x), batches))              # doctest: +SKIP
    """

    def __init__(self, actors):
        self._actors = list(actors)
        if not self._actors:
            raise ValueError("ActorPool needs at least one actor")

    def map(self, fn, values):
        """Yield ``fn(actor, value).result()`` for each value, in input order."""
        return self._run(fn, values, ordered=True)

    def map_unordered(self, fn, values):
        """Like ``map`` but yields results as they complete."""
        return self._run(fn, values, ordered=False)

    def _run(self, fn, values, ordered):
        values = iter(values)
        idle = deque(self._actors)
        in_flight = {}  # future -> (index, actor)
        done_by_index = {}
        index = 0
        next_out = 0
        while True:
            while idle:  # give every idle actor one value
                try:
                    value = next(values)
                except StopIteration:
                    break
                a = idle.popleft()
                in_flight[fn(a, value)] = (index, a)
                index += 1
            if not in_flight:
                return
            done, _ = wait(list(in_flight), return_when=FIRST_COMPLETED)
            for f in done:
                i, a = in_flight.pop(f)
                idle.append(a)
                if ordered:
                    done_by_index[i] = f
                else:
                    yield f.result()
            while next_out in done_by_index:
                yield done_by_index.pop(next_out).result()
                next_out += 1
