"""Task functions for the tests, importable by workers (fault injection lives here)."""

import logging
import os
import signal
import socket
import sys
import time


def noop(*args, **kwargs):
    return None


def identity(x):
    return x


def add(a, b=0, *, c=0):
    return a + b + c


def square(x):
    return x * x


def sleep_then(seconds, value=None):
    time.sleep(seconds)
    return value


def where():
    return {"host": socket.gethostname(), "pid": os.getpid(),
            "cuda": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "affinity": sorted(os.sched_getaffinity(0)), "env_x": os.environ.get("MINIRAY_TEST_X")}


class CustomError(Exception):
    """An exception with extra state that must survive the trip back."""

    def __init__(self, message, code=0):
        super().__init__(message, code)
        self.code = code


def raise_custom(message="boom", code=7):
    raise CustomError(message, code)


def raise_value_error(x):
    if x == 3:
        raise ValueError(f"bad item {x}")
    return x


class UnpicklableError(Exception):
    def __init__(self, a, b):  # unpickling calls cls(*args) with one arg: fails
        super().__init__(f"{a}-{b}")


def raise_unpicklable():
    raise UnpicklableError(1, 2)


def return_unpicklable():
    import threading

    return threading.Lock()


def unpicklable_at(x, bad):
    """``x``, except at ``bad``: a lock, which cannot travel back."""
    import threading

    return threading.Lock() if x == bad else x


def segfault():
    os.kill(os.getpid(), signal.SIGSEGV)


def hard_exit(code=3):
    os._exit(code)


def exit_on(x, bad, log):
    """``x``, but the process dies (os._exit) on ``bad``; each run appends ``x`` to ``log``."""
    with open(log, "a") as f:
        f.write(f"{x}\n")
    if x == bad:
        os._exit(3)
    return x


def allocate(megabytes):
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):  # touch every page so it is really resident
        block[i] = 1
    return len(block)


def chatty(n, tag="line"):
    for i in range(n):
        print(f"{tag} {i}")
    print("to stderr", file=sys.stderr)
    logging.getLogger("tests.chatty").warning("a logging record")
    return n


def spawn_sleeper(seconds):
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    time.sleep(seconds)
    return p.pid


def make_array(n):
    import numpy as np

    return np.ones(n)


def array_sum(a):
    return float(a.sum())


def echo_bytes(b):
    return b


def spawn_sleeper_pidfile(pidfile, seconds):
    """Start a grandchild, write its pid to ``pidfile``, then sleep (to be timed out)."""
    import subprocess

    p = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({seconds})"])
    with open(pidfile, "w") as f:
        f.write(str(p.pid))
    time.sleep(seconds)
    return p.pid


def record_run(path, value=None, seconds=0.0):
    """Append this run's worker pid to ``path`` (one line per run), sleep, return ``value``."""
    with open(path, "a") as f:
        f.write(f"{os.environ.get('MINIRAY_WORKER_PID', '?')}\n")
    time.sleep(seconds)
    return value


def pid_then_sleep(path, seconds):
    """Write this task process's pid to ``path``, then sleep."""
    with open(path, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)


def kill_my_worker():
    """SIGKILL the worker running this task (its task process dies with it)."""
    os.kill(int(os.environ["MINIRAY_WORKER_PID"]), signal.SIGKILL)
    time.sleep(30)


def stamp(seconds=0.0, tag=None):
    """Sleep, then return (tag, wall-clock finish time)."""
    time.sleep(seconds)
    return tag, time.time()


INIT_STATUS = "uninitialized"


def set_init_status(value):
    global INIT_STATUS
    INIT_STATUS = value


def get_init_status():
    return INIT_STATUS


def failing_initializer():
    raise ValueError("error in initializer")


def gate(directory, tag):
    """Say "started" (with the GPUs this task sees) in ``directory``, then wait for its ``go``."""
    cuda = os.environ.get("CUDA_VISIBLE_DEVICES")
    tmp = os.path.join(directory, f".started-{tag}")
    with open(tmp, "w") as f:  # whole or not at all: the test reads it as soon as it exists
        f.write(cuda or "")
    os.replace(tmp, os.path.join(directory, f"started-{tag}"))
    deadline = time.monotonic() + 30  # a failed test still ends
    while not os.path.exists(os.path.join(directory, "go")) and time.monotonic() < deadline:
        time.sleep(0.02)
    return cuda


def fork_sleeper(i, marker, daemon=False):
    """Leave a ``sleep 600`` running whose command line starts with ``marker``: a child not
    waited for, or (``daemon``) one that double-forked into a session of its own. Returns this
    task process's pid."""
    import shutil
    import subprocess

    sleep = shutil.which("sleep")
    if not daemon:
        subprocess.Popen([marker, "600"], executable=sleep, stdin=subprocess.DEVNULL,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return os.getpid()
    pid = os.fork()
    if pid == 0:
        try:
            os.setsid()
            if os.fork() == 0:
                os.execv(sleep, [marker, "600"])
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    return os.getpid()


def start_helper_process(marker):
    """An initializer that starts a long-lived helper process (a model server, say)."""
    fork_sleeper(0, marker)


def progress_bar(n, width=20, flush=False):
    """Write ``n`` tqdm-style ``\\r`` updates to stdout (each flushed, as tqdm does, with
    ``flush``), then a newline; return the last state."""
    state = ""
    for i in range(1, n + 1):
        state = f"{i * 100 // n:3d}%|{'#' * (i * width // n):{width}s}| {i}/{n}"
        sys.stdout.write("\r" + state)
        if flush:
            sys.stdout.flush()
    sys.stdout.write("\n")
    return state


def long_lines(count, nbytes, tag="long"):
    """Print ``count`` lines of ``nbytes`` bytes each (the tag first), then a short one."""
    for i in range(count):
        print(f"{tag}{i} " + "x" * (nbytes - len(f"{tag}{i} ")))
    print(f"{tag} done")
    return count


# -- values the client cannot unpickle (tests/test_values.py) ---------------------------------
# MINIRAY_TEST_WORKER_MODULE names a module importable only where the worker runs (a tmp dir on
# its PYTHONPATH); MINIRAY_TEST_WORKER_SIDE is set only in the worker's environment.

def _rebuild_on_worker_side(value):
    if os.environ.get("MINIRAY_TEST_WORKER_SIDE") != "1":
        raise RuntimeError("this value can only be rebuilt where the worker runs")
    return value


class WorkerSideOnly:
    """Pickles fine anywhere; unpickling raises outside the worker's environment."""

    def __init__(self, value):
        self.value = value

    def __reduce__(self):
        return _rebuild_on_worker_side, (self.value,)


def mixed_values(x, worker_class_at=(), bad_reduce_at=(), worker_error_at=(), nested_at=()):
    """``x * 10``, except: a worker-only class's instance (alone, or deep in a dict of
    lists), a value whose rebuild raises on the client, or a worker-only exception raised,
    at the items named."""
    if x in nested_at:
        return {"ok": [1, 2], "deep": [[x, mixed_values(x, worker_class_at=(x,))]]}
    if x in worker_class_at or x in worker_error_at:
        import importlib

        mod = importlib.import_module(os.environ["MINIRAY_TEST_WORKER_MODULE"])
        if x in worker_error_at:
            raise mod.WorkerOnlyError(f"item {x} failed")
        return mod.WorkerOnlyThing(x)
    if x in bad_reduce_at:
        return WorkerSideOnly(x)
    return x * 10


def make_bytes(n, fill=b"r"):
    return fill * n


def record_pid_then_sleep(path, seconds, value=None):
    """Append this task process's pid to ``path`` (one line per run), sleep, return ``value``."""
    with open(path, "a") as f:
        f.write(f"{os.getpid()}\n")
    time.sleep(seconds)
    return value


def fail_every(x, n=4, seconds=0.0):
    """``x``, after ``seconds``; ValueError for every ``n``-th item."""
    time.sleep(seconds)
    if x % n == 0:
        raise ValueError(f"item {x} fails")
    return x


def burn(seconds, megabytes=0):
    """Keep one core busy for ``seconds`` while holding ``megabytes`` of resident memory."""
    block = bytearray(megabytes * 1024 * 1024)
    for i in range(0, len(block), 4096):
        block[i] = 1
    deadline = time.monotonic() + seconds
    n = 0
    while time.monotonic() < deadline:
        n += 1
    return len(block)


def print_item(x):
    """``x``, after printing ``item x`` (one log line per item)."""
    print(f"item {x}")
    return x


def stop_on(x, bad=5):
    """``x``, but raises StopIteration on ``bad`` (which ends a plain ``map(fn, ...)``)."""
    if x == bad:
        raise StopIteration(f"stop at {x}")
    return x
