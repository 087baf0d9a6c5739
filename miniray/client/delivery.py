"""Delivery: what a result message settles in an ``Executor``'s futures.

::

    Results.read_once() --> deliver(msg) --> a big message's parts assembled, a kept job's
                              |              stored result fetched, the message decoded
                              v
                            settle(ref, ...) --> the chunk's values and errors (each error
                              |                  _decorate'd: where it ran, its traceback),
                              v                  this job's tally of done and failed items
                            _complete(ref) --> the future's result, exception, or cancel

    break_executor(err): every pending future fails with ``err`` (the server was lost)

It owns the parts of a big message read so far (``parts``) and the last chunk each task
process on this machine sent to the inbox (``direct_last``), which ``await_reports`` waits
for the server to have heard of.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from miniray.errors import JobCancelledError, MinirayError, RemoteTraceback, WorkerLostError
from miniray.keys import Keys
from miniray.protocol import Assembler, LostChunk, decode_batches, decode_message, item_times
from miniray.values import bigvalues

from . import keep as _kept
from .outcomes import MISSING
from .outcomes import cancel_future as _cancel
from .outcomes import failures as _failures
from .outcomes import place as _place
from .rerun import Kept

if TYPE_CHECKING:
    from .executor import Executor
    from .outbox import _Ref

__all__ = ["Delivery"]

OK = 0


class Delivery:
    """Settles the futures of one ``Executor`` (``ex``): see the module's docstring."""

    def __init__(self, ex: "Executor"):
        self._ex = ex
        self.parts = Assembler()  # a big result message's parts popped so far
        self.direct_last: dict = {}  # (worker, pid) -> its last chunk finished that way

    def await_reports(self, timeout: float = 5.0) -> None:
        """Wait until the server has the reports of the outcomes that reached this client
        straight from their task processes (``miniray.values.inbox``), so that ``progress()``,
        ``events()`` and ``logs()`` after a ``result()`` count its task. A process reports
        right after it sends, so this is a wait only when a process was held up in between
        (each one's reports arrive in order: its last chunk finished stands for the rest)."""
        ex = self._ex
        deadline = time.monotonic() + timeout
        while self.direct_last:
            last = list(self.direct_last.items())
            there = ex._r.pipeline_raw([("HEXISTS", ex.keys.wip(worker),
                                         Keys.wip_field(ex.job_id, chunk))
                                        for (worker, _), chunk in last])
            late = time.monotonic() > deadline  # (it died before reporting: the chunk reruns)
            with ex._lock:
                for (key, chunk), held in zip(last, there):
                    if (not held or late) and self.direct_last.get(key) == chunk:
                        del self.direct_last[key]
            if late:
                return
            time.sleep(0.002)

    def deliver(self, msg: bytes, direct: bool = False) -> None:
        """Settle what a result message says (``direct``: it came to the inbox)."""
        ex = self._ex
        if not direct and not self.parts.left and msg[:1] == b"P":  # a kept job's result,
            # stored on the server (a part of a big message may start with any byte)
            msg = _kept.fetch(ex._results.rr, ex.keys, msg)
            if msg is None:
                return  # (gone: the job expired; its futures fail with the job)
        elif not direct:  # a big message comes in parts (see protocol.encode_result)
            msg = self.parts.feed(msg)
            if msg is None:
                return
        if msg == b"S":
            return  # shutdown's wake-up call
        decoded = decode_message(msg)
        if isinstance(decoded, LostChunk):
            ref = ex._refs.get(decoded.chunk)
            if ref is not None:
                if decoded.reason == "closing":
                    err = WorkerLostError(
                        f"worker {decoded.worker} was lost (or left) while it ran this task, "
                        "after shutdown(cancel_futures=True) had dropped the job's queue, so "
                        "the task could not run again")
                else:
                    err = WorkerLostError(
                        f"worker {decoded.worker} stopped heartbeating while it held this "
                        f"task, and the task was already retried {ex._settings.max_retries}"
                        " time(s) (MINIRAY_MAX_RETRIES); the task may crash its worker")
                self.settle(ref, None, [], {-1: (err, "", None)}, True, decoded.worker, "?", 0)
            return
        header, blob = decoded
        bigvalues.reading(ex.redis_url)  # (where its big buffers are, if it has any)
        if direct:  # its process's report follows: see await_reports
            finals = [chunk for chunk, final in header.chunks if final]
            if finals:
                with ex._lock:
                    self.direct_last[(header.worker, header.pid)] = finals[-1]
        refs = [ex._refs.get(chunk) for chunk, _ in header.chunks]
        if not any(refs):  # duplicates after a retry, or cancelled tasks
            if ex._shm is not None and not isinstance(blob, Exception):
                decode_batches(blob, header.host, [None] * len(refs))  # (frees its files)
            return
        if isinstance(blob, Exception):  # another protocol version: fail what it was for
            batches = [(None, [], {-1: (blob, "", header.pid)}, None)] * len(refs)
        else:  # a value that cannot be unpickled here fails only its own item
            batches = decode_batches(blob, header.host,
                                     [None if ref is None else ref.start for ref in refs])
        for ref, (_, final), (indices, values, errors, times) in zip(refs, header.chunks,
                                                                     batches):
            if ref is not None:
                self.settle(ref, indices, values, errors, final, header.worker, header.host,
                            header.pid, times, header.slot)

    def settle(self, ref: "_Ref", indices, values, errors, final, worker, host, pid,
               times=None, slot=None) -> None:
        ex = self._ex
        if -1 in errors:  # one error for every item not delivered yet
            err = errors.pop(-1)
            if ref.is_map:
                indices = [i for i, v in enumerate(ref.values) if v is MISSING]
            else:
                indices = [0] if ref.left else []
            values = [None] * len(indices)
            errors = {i: err for i in indices}
        for i, (exc, tb, epid) in errors.items():
            errors[i] = _decorate(exc, tb, ref.start + i, ex.job_id, worker, host, epid or pid)
        tally = ex._tally
        if not ref.is_map:
            if ref.left and (values or errors):
                ref.left = 0
                if not errors:
                    tally[0] += 1
                elif not isinstance(errors[0], JobCancelledError):
                    tally[1] += 1
                fut = ref.future
                fut.slot, fut._times = slot, times
                if errors and ref.kept is not None and not isinstance(errors[0],
                                                                      JobCancelledError):
                    fut._rerun = Kept(ex.redis_url, ex.keys, ref.sha, ref.kept, fut.job)
                _complete(ref, (1, errors[0]) if errors else (OK, values[0]), worker, host)
        else:
            vals = ref.values
            if isinstance(indices, range) and ref.left == ref.count and indices.step == 1:
                vals[indices.start:indices.stop] = values  # the common case: one slice
                ref.left -= len(indices)
                ref.errors.update(errors)
                tally[0] += len(indices) - len(errors)
                if errors:
                    tally[1] += _failures(errors.values())
            else:
                for k, i in enumerate(indices):
                    if vals[i] is MISSING:
                        vals[i] = values[k]
                        ref.left -= 1
                        if i in errors:
                            ref.errors[i] = errors[i]
                            tally[1] += _failures((errors[i],))
                        else:
                            tally[0] += 1
            items = getattr(ref.future, "_items", None)
            if items is not None:  # map_futures: each item's future says where and when
                _place(items, indices, worker, host, slot, item_times(times, len(values)))
            if ref.left <= 0:
                if ref.errors and ref.kept is not None:  # for its failed items (split_chunk)
                    ref.future._rerun = Kept(ex.redis_url, ex.keys, ref.sha, ref.kept,
                                             ref.future.job)
                _complete(ref, (OK, (vals, ref.errors)), worker, host)
        if ref.left <= 0:
            ex._outbox.free(ref, reuse=True)
            with ex._lock:
                ex._refs.pop(ref.chunk, None)
            ref.future._ref = None  # nothing may keep a result alive but its future
            ref.values = ref.errors = ref.kept = None

    def break_executor(self, err: BaseException) -> None:
        """The executor is broken (``err``): every pending future fails with it."""
        ex = self._ex
        with ex._lock:
            ex._broken = err
            refs, ex._refs = list(ex._refs.values()), {}
            ex._outbox.queue.clear()
            ex._wakeup.notify_all()
        ex._results.poke()
        for ref in refs:
            ex._outbox.free(ref)
            fut = ref.future
            with fut._condition:
                if fut._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"):
                    continue
            try:
                fut.set_exception(err)
            except Exception:
                pass


def _complete(ref: "_Ref", value, worker, host) -> None:
    fut = ref.future
    fut.worker, fut.host = worker, host
    with fut._condition:
        if fut._state in ("CANCELLED", "CANCELLED_AND_NOTIFIED", "FINISHED"):
            return
        if fut._state == "PENDING":
            fut._state = "RUNNING"
    if value[0] != OK and isinstance(value[1], JobCancelledError):
        with fut._condition:  # the job was cancelled: the future is cancelled, not failed
            fut._state = "PENDING"
        _cancel(fut)
        return
    try:
        if value[0] == OK:
            fut.set_result(value[1])
        else:
            fut.set_exception(value[1])
    except Exception:  # InvalidStateError from a concurrent cancel: nothing to deliver
        pass


def _decorate(exc, tb: str, task: int, job: str, worker: str, host: str, pid) -> BaseException:
    """The task's own exception, with the worker's traceback chained and where it ran."""
    if not isinstance(exc, BaseException):
        exc = MinirayError(f"task {task} failed with a non-exception {exc!r}")
    argument = getattr(tb, "argument", None)  # a TaskTraceback's: see miniray.tracebacks
    where = f"task {task}" + (f" (argument {argument})" if argument is not None else "") + (
        f" of job {job} on {host} (worker {worker}") + (f", pid {pid})" if pid else ")")
    if tb:
        cause = RemoteTraceback(f'\n"""\nTraceback from {where}:\n{tb.rstrip()}\n"""',
                                getattr(tb, "frames", ()), getattr(tb, "chain", ()), argument)
        exc.__cause__ = cause
    if hasattr(exc, "add_note"):
        note = f"[miniray] raised by {where}"
        if note not in (getattr(exc, "__notes__", None) or ()):
            exc.add_note(note)
    return exc
