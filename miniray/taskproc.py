"""The task process: a worker's child that runs chunks of tasks, one item at a time.

Started as ``python -m miniray.taskproc FD PROGRESS_FD [CGROUP]`` with a socket to its worker.
It joins its memory cgroup, pins its CPUs and applies its environment before it unpickles
anything, then loops: receive a chunk, run each item, send the outcomes back. Outcomes of fast
items are batched (one pickle per batch, flushed every ``FLUSH_SECONDS``); a slow item's
outcome goes at once. Before each item it writes (chunk seq, item index, start time) to a
shared page, so the worker can enforce timeouts and knows which item was running if this
process dies. stdout, stderr and ``logging`` are captured line by line and sent as log lines.

Worker -> task process::
    ("run", [(seq, group, sha, skip, env, nframes, init sha), ...], [(sha, fn bytes), ...])
    + frames
Task process -> worker::
    ("res", group, [(seq, final, indices, n_ok, n_err), ...], blob)
    ("log", [(seq, idx, stream, text), ...])

``group`` is the job: outcomes are batched per job, and ``blob`` (the pickled list of
``(indices, values, errors)`` batches, one per header entry) goes unopened to that job's
client. ``indices`` is a range, a list, or None for "every item not reported yet";
``errors`` maps an item index to ``(exception, traceback text, pid)``.
"""

from __future__ import annotations

import ctypes
import io
import logging
import mmap
import os
import pickle
import signal
import struct
import sys
import threading
import time
import traceback

PROGRESS = struct.Struct("qqd")  # chunk seq, item index, monotonic start time
FLUSH_SECONDS = 0.02


def _send(conn, lock, obj) -> None:
    data = pickle.dumps(obj, protocol=5)
    with lock:
        conn.send_bytes(data)


class _LineWriter(io.TextIOBase):
    """A text stream that ships each complete line to the worker."""

    def __init__(self, runner, name: str):
        self.runner, self.name, self._buf = runner, name, ""

    def writable(self):
        return True

    def write(self, s):
        if not isinstance(s, str):
            raise TypeError(f"write() argument must be str, not {type(s).__name__}")
        self._buf += s
        if "\n" in self._buf:
            *lines, self._buf = self._buf.split("\n")
            self.runner.log(self.name, lines)
        return len(s)

    def flush(self):
        if self._buf:
            line, self._buf = self._buf, ""
            self.runner.log(self.name, [line])

    @property
    def encoding(self):
        return "utf-8"

    def isatty(self):
        return False


class _LogHandler(logging.Handler):
    def __init__(self, runner):
        super().__init__()
        self.runner = runner
        self.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))

    def emit(self, record):
        try:
            self.runner.log("logging", [self.format(record)])
        except Exception:
            self.handleError(record)


class Runner:
    def __init__(self, conn, progress: mmap.mmap):
        self.conn, self.progress = conn, progress
        # the shared page as (seq, index, start) views: cheaper than struct per item
        self.prog_i = memoryview(progress).cast("q")
        self.prog_t = memoryview(progress).cast("d")
        self.lock = threading.Lock()
        self.functions: dict = {}
        self.seq, self.idx = -1, -1
        self.pending: dict = {}  # group -> ([header], [batch]) not yet sent
        self.initialized: dict = {}  # group -> None, or the initializer's failure
        self.last_flush = time.monotonic()

    def log(self, stream: str, lines) -> None:
        _send(self.conn, self.lock, ("log", [(self.seq, self.idx, stream, t) for t in lines]))

    def function(self, sha: str):
        fn = self.functions[sha]
        if isinstance(fn, bytes):
            fn = self.functions[sha] = pickle.loads(fn)
        return fn

    def serve(self) -> None:
        conn = self.conn
        while True:
            try:
                msg = pickle.loads(conn.recv_bytes())
            except (EOFError, OSError):
                return
            if msg[0] == "stop":
                return
            _, chunks, fns = msg
            for sha, data in fns:
                self.functions[sha] = data
            batch = [(spec, [conn.recv_bytes() for _ in range(spec[5])]) for spec in chunks]
            for (seq, group, sha, skip, env, _, init), frames in batch:
                self.run_chunk(seq, group, sha, skip, env, frames, init)
            if not conn.poll(0) or time.monotonic() - self.last_flush >= FLUSH_SECONDS:
                self.flush()

    def initialize(self, group, init) -> None:
        """Run the job's initializer once in this process; remember how it went."""
        if group in self.initialized:
            return
        try:
            self.function(init)()
            self.initialized[group] = None
        except BaseException as e:
            from miniray.errors import InitializerError

            err = InitializerError(
                f"the executor's initializer raised {type(e).__name__}: {_short(e)}, so no "
                "task of this job can run in this process; fix the initializer and submit "
                "again (its traceback is chained below)")
            self.initialized[group] = _portable_exc(err, traceback.format_exc())

    def run_chunk(self, seq, group, sha, skip, env, frames, init=None) -> None:
        self.seq = seq
        saved = _apply_env(env)
        progress, monotonic = self.progress, time.monotonic
        try:
            try:
                if init:
                    self.initialize(group, init)
                    failed = self.initialized[group]
                    if failed is not None:
                        self.add(group, seq, True, None, [], {-1: failed}, 0, -1)
                        return
                fn = self.function(sha)
                kind, *payload = pickle.loads(frames[0], buffers=frames[1:])
            except BaseException as e:  # the whole chunk fails the same way
                err = _portable_exc(e, traceback.format_exc())
                self.add(group, seq, True, None, [], {-1: err}, 0, -1)
                return
            if kind == "s":
                items, kwargs, star = [payload[0]], payload[1], True
            else:  # "m": tuples of arguments; "m1": one argument each (map over one iterable)
                items, kwargs, star = payload[0], None, kind == "m"
            values, errors, done = [], {}, []
            append, prog_i, prog_t = values.append, self.prog_i, self.prog_t
            first = 0
            prog_i[0] = seq
            for i, args in enumerate(items):
                if skip and i in skip:
                    continue
                now = monotonic()
                if now - self.last_flush >= FLUSH_SECONDS and values:
                    idx = done if skip else range(first, i)
                    self.add(group, seq, False, idx, values, errors,
                             len(values) - len(errors), len(errors))
                    self.flush()
                    values, errors, done, first = [], {}, [], i
                    append = values.append
                self.idx = prog_i[1] = i
                prog_t[2] = now
                try:
                    if not star:
                        append(fn(args))
                    elif kwargs:
                        append(fn(*args, **kwargs))
                    else:
                        append(fn(*args))
                except BaseException as e:  # SystemExit and KeyboardInterrupt fail the item too
                    append(None)
                    errors[i] = _portable_exc(e, traceback.format_exc())
                if skip:
                    done.append(i)
            _flush_streams()
            idx = done if skip else range(first, len(items))
            self.add(group, seq, True, idx, values, errors, len(values) - len(errors),
                     len(errors))
        finally:
            PROGRESS.pack_into(progress, 0, -1, -1, 0.0)
            _restore_env(saved)
            self.idx = -1

    def add(self, group, seq, final, indices, values, errors, n_ok, n_err) -> None:
        heads, batches = self.pending.setdefault(group, ([], []))
        heads.append((seq, final, indices, n_ok, n_err))
        batches.append((indices, values, errors))

    def flush(self) -> None:
        pending, self.pending = self.pending, {}
        for group, (heads, batches) in pending.items():
            _send(self.conn, self.lock, ("res", group, heads, _dumps_batches(batches)))
        self.last_flush = time.monotonic()


def _dumps_batches(batches) -> bytes:
    # Plain pickle first: results are mostly plain data, and the C pickler is several times
    # faster on small objects. Classes from the notebook pickle by reference, which is right:
    # the notebook that reads them defines them. cloudpickle covers the rest (local classes,
    # lambdas); only if that fails too is the culprit looked for.
    try:
        return pickle.dumps(batches, protocol=5)
    except Exception:
        pass
    import cloudpickle

    try:
        return cloudpickle.dumps(batches, protocol=5)
    except Exception:
        pass
    for indices, values, errors in batches:  # find the culprits; each becomes an error
        positions = list(indices) if indices is not None else []
        for k, value in enumerate(values):
            i = positions[k] if k < len(positions) else k
            if i in errors:
                continue
            try:
                cloudpickle.dumps(value, protocol=5)
            except Exception as e:
                from miniray.errors import SerializationError

                values[k] = None
                errors[i] = (SerializationError(
                    f"the task's result {_short(value)} cannot be pickled to travel back: "
                    f"{type(e).__name__}: {e}. Return plain data (or make the type "
                    "picklable)."), "", os.getpid())
    return cloudpickle.dumps(batches, protocol=5)


def _portable_exc(e: BaseException, tb: str):
    """(exception, traceback text), with an exception that survives a pickle round trip."""
    import cloudpickle

    try:
        pickle.loads(cloudpickle.dumps(e, protocol=5))
        return e, tb, os.getpid()
    except Exception as why:
        from miniray.errors import SerializationError

        err = SerializationError(
            f"the task raised {type(e).__name__}: {_short(e)}, which cannot be pickled to "
            f"travel back ({type(why).__name__}: {why}); its traceback follows"
        )
        return err, tb, os.getpid()


def _short(obj) -> str:
    from miniray.serialization import short_repr

    return short_repr(obj, 100)


def _flush_streams():
    for s in (sys.stdout, sys.stderr):
        try:
            s.flush()
        except Exception:
            pass


def _apply_env(env):
    if not env:
        return None
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    return saved


def _restore_env(saved):
    if not saved:
        return
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def _set_pdeathsig() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    fd, progress_fd = int(argv[0]), int(argv[1])
    _set_pdeathsig()
    if os.getppid() != int(os.environ.get("MINIRAY_WORKER_PID", os.getppid())):
        sys.exit(0)  # the worker died before we set the death signal
    cgroup = os.environ.pop("MINIRAY_TASK_CGROUP", "")
    rlimit = os.environ.pop("MINIRAY_TASK_RLIMIT_AS", "")
    cpus = os.environ.pop("MINIRAY_TASK_CPUS", "")
    if cgroup:
        from miniray.isolation import MemoryCgroup

        MemoryCgroup.join(cgroup)
    if rlimit:
        from miniray.isolation import apply_rlimit_as

        apply_rlimit_as(int(rlimit))
    if cpus:
        from miniray.isolation import pin_cpus

        pin_cpus([int(c) for c in cpus.split(",")])
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    progress = mmap.mmap(progress_fd, PROGRESS.size)
    runner = Runner(conn, progress)
    sys.stdout = _LineWriter(runner, "stdout")
    sys.stderr = _LineWriter(runner, "stderr")
    root = logging.getLogger()
    root.addHandler(_LogHandler(runner))
    if root.level == logging.WARNING:
        root.setLevel(logging.INFO)
    runner.serve()


if __name__ == "__main__":
    main()
