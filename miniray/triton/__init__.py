"""Triton Inference Server from inside a task: a client for the node's server, and its models
loaded once per node.

Run the task on a worker that keeps a Triton server (``miniray worker --triton-models DIR``, or
``--triton-url URL``) by asking for one::

    def add_one(x):
        import numpy as np
        import tritonclient.http as httpclient
        import miniray.triton

        miniray.triton.load_model("add_one", stale_after_seconds=600)  # once per node; cheap after
        c = miniray.triton.client()
        inp = httpclient.InferInput("INPUT0", [1], "FP32")
        inp.set_data_from_numpy(np.array([x], dtype=np.float32))
        return float(c.infer("add_one", [inp]).as_numpy("OUTPUT0")[0])

    with miniray.Executor(limits=miniray.Limits(triton=True)) as ex:
        print(list(ex.map(add_one, range(10))))

``client`` needs ``tritonclient`` (``pip install "miniray[triton]"``); ``load_model`` and
``unload_model`` speak Triton's HTTP API themselves. An ``InferenceServerException`` that a
task lets escape (once ``client`` was called in its process) comes back to the caller as
:class:`~miniray.errors.TritonError` with its text.

This folder holds both ends. This module is the task-side client (what a task process calls);
the node's server is the worker's: ``server.py`` (``TritonServer``: start, health-check,
restart, unload stale models), ``binary.py`` (finding ``tritonserver`` and what the
``nvidia-pytriton`` wheel's needs), ``httpapi.py`` (Triton's HTTP API, which both ends speak).
The worker tells its task processes where the server is (``server.ENV_*``); the per-server
load lock and last-use records live in Redis (``keys.py``)::

    task process                          worker (miniray worker --triton)
    miniray.triton.load_model ---HTTP---> tritonserver <--- TritonServer (server.py)
      (redis_lock, last use) --> Redis <----------------------- unloads stale models
"""

from __future__ import annotations

import os
import threading
import time

from miniray.errors import ConfigurationError, TritonError

from .httpapi import model_ready, repository_call, server_ready
from .server import ENV_GRPC, ENV_HTTP, ENV_SERVER, redis_lock

__all__ = ["client", "load_model", "unload_model", "url"]

_redis_lock = threading.Lock()
_redis = None  # (connection, Keys) of this process, made on first use


def _where() -> tuple[str, str, str]:
    http = os.environ.get(ENV_HTTP)  # set by the worker in its task processes
    if not http:
        raise TritonError(
            "there is no Triton server here: miniray.triton works inside a task that runs on "
            "a worker started with `miniray worker --triton-models DIR` (or --triton-url URL). "
            "Submit the task with Limits(triton=True) so it goes to such a worker")
    return http, os.environ.get(ENV_GRPC, ""), os.environ.get(ENV_SERVER, http)


def url(protocol: str = "http") -> str:
    """``host:port`` of the node's Triton server for ``protocol`` ("http" or "grpc")."""
    http, grpc, _ = _where()
    if protocol == "http":
        return http
    if protocol == "grpc":
        if not grpc:
            raise TritonError(
                "this worker knows no gRPC address of its Triton server: it attached to it by "
                "HTTP (--triton-url) only. Start the worker with --triton-grpc-url too, or use "
                "client('http')")
        return grpc
    raise ConfigurationError(f"protocol={protocol!r}: use 'http' or 'grpc'")


def client(protocol: str = "http", **kwargs):
    """A ``tritonclient`` ``InferenceServerClient`` for the node's server (a new one per call).

    ``kwargs`` go to the client's constructor (e.g. ``network_timeout=`` for HTTP).
    """
    address = url(protocol)
    try:
        if protocol == "http":
            import tritonclient.http as module
        else:
            import tritonclient.grpc as module
    except ImportError as e:
        raise TritonError(
            f"miniray.triton.client() needs tritonclient, which this task's Python cannot "
            f"import ({e}); install it where the workers run: pip install \"miniray[triton]\" "
            "(or pip install \"tritonclient[http,grpc]\")") from None
    _portable_client_errors()
    return module.InferenceServerClient(url=address, **kwargs)


def _portable_client_errors() -> None:
    """Let tritonclient's errors travel back to the caller, as TritonError.

    ``InferenceServerException`` cannot be unpickled (it never passes its arguments to
    ``Exception``), so on its own it would come back as a SerializationError; and the caller
    may not have tritonclient at all.
    """
    import copyreg

    from tritonclient.utils import InferenceServerException

    copyreg.pickle(InferenceServerException, _as_triton_error)


def _as_triton_error(e):
    message = (f"the node's Triton server or tritonclient failed: {e} (a tritonclient "
               "InferenceServerException in the task, re-raised here as TritonError)")
    return TritonError, (message,)


def load_model(name: str, stale_after_seconds: float | None = None,
               timeout: float = 600.0) -> None:
    """Make sure model ``name`` is loaded on the node's server, and record that it is in use.

    The first task on a node to ask loads it, under a Redis lock that every task on the node
    shares (the others wait for it, up to ``timeout`` s, and then find it loaded). Each call
    records a use: with ``stale_after_seconds`` (default ``MINIRAY_TRITON_STALE_SECONDS``;
    unset or 0: never) the worker unloads the model once no task has called ``load_model``
    for it that long, so call it before each use; it is cheap once the model is loaded. The
    last call's ``stale_after_seconds`` wins.
    """
    from miniray.config import settings

    http, _, server = _where()
    stale = settings().triton_stale_seconds if stale_after_seconds is None else stale_after_seconds
    if stale is not None and (isinstance(stale, bool) or not isinstance(stale, (int, float))
                              or stale < 0):
        raise ConfigurationError(
            f"stale_after_seconds={stale!r} must be a number of seconds >= 0 (0: never unload)")
    r, keys = _connection()
    deadline = time.monotonic() + timeout
    with redis_lock(r, keys.triton_lock(server, name), timeout + 60, timeout) as held:
        if not held:
            raise TritonError(
                f"waited {timeout:g} s for another task on this node to finish loading model "
                f"{name!r}; it may be very large, or its loader died (the lock expires "
                f"{timeout + 60:g} s after it was taken). Pass a larger timeout= or try again")
        if not model_ready(http, name):
            _wait_ready(http, deadline)
            repository_call(http, name, "load", timeout=max(1.0, deadline - time.monotonic()))
        r.execute("HSET", keys.triton_used(server), name, f"{time.time():.3f} {stale or 0:g}")


def unload_model(name: str, timeout: float = 600.0) -> None:
    """Unload model ``name`` from the node's server now (every task on the node loses it)."""
    http, _, server = _where()
    r, keys = _connection()
    with redis_lock(r, keys.triton_lock(server, name), timeout + 60, timeout) as held:
        if not held:
            raise TritonError(
                f"waited {timeout:g} s for another task on this node that holds model {name!r}'s "
                "lock (loading it); pass a larger timeout= or try again")
        repository_call(http, name, "unload", timeout=timeout)
        r.execute("HDEL", keys.triton_used(server), name)


def _wait_ready(http: str, deadline: float) -> None:
    while not server_ready(http):
        if time.monotonic() > deadline:
            raise TritonError(
                f"the node's Triton server at http://{http} is not ready (it may be starting "
                "or restarting after a crash; `miniray status` shows it and its last error). "
                "Try again, or pass a larger timeout=")
        time.sleep(0.2)


def _connection():
    global _redis
    with _redis_lock:
        if _redis is None:
            from miniray.broker import connect
            from miniray.config import settings
            from miniray.keys import Keys

            s = settings()
            if not s.redis_url:
                raise TritonError(
                    "miniray.triton cannot reach the cluster's Redis for its per-node lock: "
                    "MINIRAY_REDIS_URL is not set in this task (a --triton worker sets it); "
                    "run the task on such a worker")
            _redis = connect(s.redis_url), Keys(s.namespace)
        return _redis
