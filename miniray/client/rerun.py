"""Re-run a failed task in this process (``MinirayFuture.rerun_locally``), as Dask's
``recreate_error_locally`` does: the same function and the same argument(s), both as they
travelled, so that the exception is raised here with a traceback through the user's code
(``%debug``, ``pdb.pm()``, ``%miniray debug``).

::

    submit/map_futures --> _Ref.kept (the chunk's payload, if small: see settings)
    _settle: a chunk with failures hands it to its failed futures (``Kept``) -- the rest drop it
    prepare_rerun(future) --> payload: decode_chunk -> pickle.loads -> the item's argument(s)
                          --> function: GET fn:{sha} from the cluster -> pickle.loads
    rerun_locally(future) --> fn(*args, **kwargs) here (%miniray debug calls them itself)

The function is fetched back from the cluster (the client drops its pickled bytes once they
are uploaded); that fetch is bounded in time. Nothing of a worker's limits applies here (no
timeout, memory or CPU limit, no GPUs assigned, no job ``env``, no initializer run).
"""

from __future__ import annotations

import pickle
import threading
import warnings

from miniray.errors import RerunError, RerunSucceededWarning, ServerError
from miniray.protocol import decode_chunk

__all__ = ["Kept", "prepare_rerun", "rerun_locally", "task_call"]

_FETCH_SECONDS = 10.0  # the most a rerun waits for the cluster to give the function back


class Kept:
    """What a failed chunk left for its failed futures to re-run: where its function lives
    (``url``, ``keys``, ``sha``), its stored payload (``fields``), and its job."""

    __slots__ = ("url", "keys", "sha", "fields", "job")

    def __init__(self, url, keys, sha, fields, job):
        self.url, self.keys, self.sha, self.fields, self.job = url, keys, sha, fields, job


def task_call(kept: Kept, task_id: int) -> tuple:
    """``(args, kwargs)`` of task ``task_id`` unpickled from its chunk's payload, as a worker
    unpickles it (see ``miniray.worker.task.run.arguments``); out-of-band buffers are copied first,
    as the worker gets copies, so the rerun cannot change the caller's own arrays."""
    head, frames = decode_chunk([bytes(f) for f in kept.fields])
    kind, *payload = pickle.loads(frames[0], buffers=[bytes(b) for b in frames[1:]])
    if kind == "s":
        args, kwargs = payload
        return tuple(args), dict(kwargs)
    item = payload[0][task_id - head.start]
    if kind == "m":
        return tuple(item), {}
    return (item,), {}


def _fetch_function(kept: Kept):
    """The task's function, unpickled from the bytes stored on the cluster (``fn:{sha}``)."""
    from miniray.broker import _redact, connect

    box: list = []

    def get():
        conn = None
        try:
            conn = connect(kept.url)
            box.append(conn.execute("GET", kept.keys.fn(kept.sha)))
        except BaseException as e:  # (handed to the caller)
            box.append(e)
        finally:
            if conn is not None:
                conn.close()

    # in a thread: a server that hangs (SIGSTOP) answers neither AUTH nor GET, and the
    # caller must not hang with it
    t = threading.Thread(target=get, daemon=True, name="miniray-rerun-fetch")
    t.start()
    t.join(_FETCH_SECONDS)
    where = _redact(kept.url)
    if not box:
        raise ServerError(
            f"cannot re-run the task here: the cluster at {where} did not give its function "
            f"back within {_FETCH_SECONDS:.0f} s (is the server paused or overloaded?); try "
            "again once it answers")
    got = box[0]
    if isinstance(got, BaseException):
        raise ServerError(
            f"cannot re-run the task here: its function is kept on the cluster at {where}, "
            f"which cannot be reached ({got}). Was the cluster shut down (%miniray down, "
            "miniray.shutdown())? Start it again and submit the task again.") from None
    if got is None:
        raise RerunError(
            f"cannot re-run the task here: its function (fn:{kept.sha[:12]}...) of job "
            f"{kept.job} is no longer on the cluster at {where}: it expired after "
            "MINIRAY_FUNCTION_TTL_SECONDS, or the server restarted or was flushed. Submit "
            "the task again (it stores the function again), then re-run the new failure.")
    return pickle.loads(got)


def prepare_rerun(future) -> tuple:
    """``(fn, args, kwargs)`` of ``future``'s failed task, unpickled here as a worker would
    (the notebook's ``%miniray debug`` calls them itself). Raises ``RerunError`` when the
    future is not done, did not fail, was cancelled, or what the task needs is gone."""
    what = f"task {future.task_id} of job {future.job}"
    if future.cancelled():
        raise RerunError(f"cannot re-run {what}: it was cancelled, so it did not fail")
    if not future.done():
        raise RerunError(
            f"cannot re-run {what}: it has not finished yet; wait for it "
            "(future.exception()) and re-run it if it failed")
    err = future.exception()
    if err is None:
        raise RerunError(f"cannot re-run {what}: it did not fail (it returned a value); "
                         "there is no error to re-create")
    kept = getattr(future, "_rerun", None)
    if kept is None:
        raise RerunError(
            f"cannot re-run {what} here: its arguments were not kept. The client keeps a "
            "task's pickled arguments up to MINIRAY_RERUN_KEEP_BYTES (a chunk's, for map "
            "items) for submit() and map_futures() futures that ran on a worker and failed; "
            f"this one failed with {type(err).__name__} before or without that (a lost server, "
            "an abandoned job, arguments too big to keep). Raise the setting and submit again")
    args, kwargs = task_call(kept, future.task_id)
    return _fetch_function(kept), args, kwargs


def rerun_locally(future):
    """Re-run ``future``'s failed task here (see ``MinirayFuture.rerun_locally``)."""
    fn, args, kwargs = prepare_rerun(future)
    value = fn(*args, **kwargs)  # the user's exception goes up from here, as it is
    err = future.exception()
    warnings.warn(
        f"task {future.task_id} of job {future.job} failed on its worker with "
        f"{type(err).__name__}, but it did not fail here: re-run here it returned a value "
        "(returned now). The failure depends on where it ran: the worker's limits, "
        "environment, GPUs, files, or chance", RerunSucceededWarning, stacklevel=3)
    return value
