"""Running one chunk in the task process: the user's function over its items, and the outcomes.

::

    run_chunk --> the job's initializer (once, see functions.py) --> the function
              --> arguments(): the payload (shm, big values) unpickled into items
              --> items one by one (the exact loop: page written before each item), or in
                  blocks (itemblocks: many small items, fast)
              --> runner.add(outcomes); every FLUSH_SECONDS runner.flush() streams them

The functions take the task process's ``Runner`` (``process.py``), as ``itemblocks.run`` does:
they write the page (``prog_i``/``prog_t``), what runs now (``seq``, ``idx``, ``in_task``,
for log lines and the SIGINT of a cancel) and ``shm_read``, and hand outcomes to
``runner.add``/``runner.flush``. A task's exception travels back as ``portable_exc`` makes
it: one that survives pickling, with the user's frames only (``miniray.tracebacks``).
"""

from __future__ import annotations

import os
import pickle
import sys
import time

from miniray.tracebacks import task_traceback
from miniray.values import bigvalues, shm
from miniray.worker.jobspec import bad_payload, malformed

from . import itemblocks
from .output import end_lines

__all__ = ["FLUSH_SECONDS", "CancelInterrupt", "run_chunk", "portable_exc", "short"]

FLUSH_SECONDS = 0.02
_SEQ = (list, tuple)  # what a chunk's arguments may travel in


def run_chunk(runner, seq, group, sha, skip, env, frames, init=None, spec=None) -> None:
    """Run chunk ``seq``'s items (of job ``group``); its outcomes go to ``runner.add``."""
    runner.seq = seq
    runner.in_task = True
    saved = apply_env(env)
    monotonic = time.monotonic
    try:
        try:
            if init:
                runner.functions.initialize(group, init, runner.leftovers)
                failed = runner.functions.initialized[group]
                if failed is not None:
                    runner.add(group, seq, True, None, [], {-1: failed}, 0, -1)
                    return
            fn = runner.functions.function(sha, group)
            items, kwargs, star, timed = arguments(runner, group, seq, frames)
        except BaseException as e:  # the whole chunk fails the same way
            err = portable_exc(e, task_traceback(e))
            runner.add(group, seq, True, None, [], {-1: err}, 0, -1)
            return
        if itemblocks.usable(spec or {}, timed, skip, kwargs):  # many small items, fast
            first, values, errors = itemblocks.run(
                runner, fn, items, star, group, seq, FLUSH_SECONDS,
                lambda e, args: portable_exc(e, task_traceback(e, args, not star)))
            end_lines((sys.stdout, sys.stderr))
            runner.add(group, seq, True, range(first, len(items)), values, errors,
                     len(values) - len(errors), len(errors))
            return
        values, errors, done = [], {}, []
        append, prog_i, prog_t = values.append, runner.prog_i, runner.prog_t
        # each item's start (monotonic), for its timing: the wall clock's offset goes
        # with them (see protocol.item_times); an item ends where the next one starts
        offset = time.time() - monotonic()
        starts = [offset]
        mark = starts.append
        first = 0
        prog_i[0] = seq
        for i, args in enumerate(items):
            if skip and i in skip:
                continue
            now = monotonic()
            if now - runner.last_flush >= FLUSH_SECONDS and values:
                idx = done if skip else range(first, i)
                mark(now)
                runner.add(group, seq, False, idx, values, errors,
                         len(values) - len(errors), len(errors), timed and starts)
                prog_i[1] = -1  # between items: a death now is not this item's fault
                runner.flush()
                values, errors, done, first = [], {}, [], i
                append = values.append
                starts = [offset]
                mark = starts.append
                now = monotonic()  # (the flush was neither item's time)
            runner.idx = prog_i[1] = i
            prog_t[2] = now
            if timed:
                mark(now)
            try:
                if not star:
                    append(fn(args))
                elif kwargs:
                    append(fn(*args, **kwargs))
                else:
                    append(fn(*args))
            except BaseException as e:  # SystemExit and KeyboardInterrupt fail the item too
                append(None)
                errors[i] = portable_exc(e, task_traceback(e, args, not star))
            if skip:
                done.append(i)
        mark(monotonic())
        end_lines((sys.stdout, sys.stderr))
        idx = done if skip else range(first, len(items))
        runner.add(group, seq, True, idx, values, errors, len(values) - len(errors),
                 len(errors), timed and starts)
    finally:
        if runner.shm_read:  # its client may be gone: its files with it (see miniray.values.shm)
            runner.shm_read = False
            shm.sweep()
        prog_i = runner.prog_i
        prog_i[0] = prog_i[1] = -1
        runner.prog_t[2] = 0.0
        runner.in_task = False
        restore_env(saved)
        runner.idx = -1


def arguments(runner, job, seq, frames) -> tuple:
    """A chunk's ``(items, kwargs, star, timed)``; an error that says so when its payload
    is not one this version writes (all of the chunk fails: not this process). ``timed``:
    its items' timings are wanted (a submit's, a ``map_futures`` chunk's)."""
    frames, used = shm.open_frames(frames)  # (a missing file: its own clear error)
    runner.shm_read = runner.shm_read or used
    frames = bigvalues.open_frames(frames, runner.claims.r)  # (big ones beside it, on the server)
    try:
        kind, *payload = pickle.loads(frames[0], buffers=frames[1:])
    except ImportError:  # a module the worker lacks: the user's error, as it is
        raise
    except Exception as e:
        raise bad_payload(job, "a task's arguments", e) from e
    count = runner.held[seq].count
    if kind == "s" and len(payload) == 2 and type(payload[0]) in _SEQ \
            and type(payload[1]) is dict and count == 1:
        return [payload[0]], payload[1], True, True
    # "m": tuples of arguments; "m1": one argument each (map over one iterable); "m1t",
    # "mt": the same, timed (map_futures)
    if kind in ("m", "m1", "m1t", "mt") and len(payload) == 1 \
            and type(payload[0]) in _SEQ and len(payload[0]) == count:
        return payload[0], None, kind in ("m", "mt"), kind in ("m1t", "mt")
    raise malformed(job, f"a chunk's arguments are {short((kind, *payload))}, not the "
                    f"{count} item(s) its head announces")


class CancelInterrupt(KeyboardInterrupt):
    """Raised in a task by its worker's SIGINT (its job was cancelled): a KeyboardInterrupt,
    so that the task's ``except Exception`` lets it through; reported as JobCancelledError."""


def portable_exc(e: BaseException, tb: str):
    """(exception, traceback), with an exception that survives a pickle round trip; ``tb``
    is a ``TaskTraceback`` (text that also carries the user's frames)."""
    import cloudpickle

    try:
        pickle.loads(cloudpickle.dumps(e, protocol=5))
        return e, tb, os.getpid()
    except Exception as why:
        from miniray.errors import SerializationError

        err = SerializationError(
            f"the task raised {type(e).__name__}: {short(e)}, which cannot be pickled to "
            f"travel back ({type(why).__name__}: {why}); its traceback follows"
        )
        return err, tb, os.getpid()


def short(obj) -> str:
    from miniray.serialization import short_repr

    return short_repr(obj, 100)


def apply_env(env):
    if not env:
        return None
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def restore_env(saved):
    if not saved:
        return
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
