"""Work functions for the channel tests, importable by forked and remote (server) workers."""

import os
import struct
import sys


def echo(h):
    while True:
        h.send(h.recv())


def report(h):
    """Send pid and selected environment, then echo."""
    h.send({"pid": os.getpid(), "cvd": os.environ.get("CUDA_VISIBLE_DEVICES"),
            "rank": os.environ.get("MINIRAY_LOCAL_RANK"), "extra": os.environ.get("EXTRA")})
    echo(h)


def exit_with(h):
    os._exit(h.recv())


def raise_error(h):
    raise ValueError("boom from the worker")


def forge_huge_frame(h):
    # A header announcing a terabyte: the receiver must refuse it before allocating.
    h._sock.sendall(struct.pack("!BQ", 0, 10**12))
    h.recv()


def sleep_forever(h):
    h.send(os.getpid())
    import time

    while True:
        time.sleep(1)


def shared_add(h):
    """Receive a SharedBuffer by pickle, add 1 to every element, report the first one."""
    buf, n = h.recv()
    a = buf.ndarray((n,), "int64")
    a += 1
    h.send(int(a[0]))
    h.recv()


def print_and_exit(h):
    print("hello from", os.getpid(), flush=True)
    sys.exit(0)


class Counter:
    """A stateful actor class for the actor tests."""

    def __init__(self, start=0):
        self.n = start

    def add(self, k=1):
        self.n += k
        return self.n

    def pid(self):
        return os.getpid()

    def fail(self, message):
        raise KeyError(message)

    def unpicklable_result(self):
        import threading

        return threading.Lock()

    def slow(self, seconds):
        import time

        time.sleep(seconds)
        return seconds

    def die(self):
        os._exit(7)


class BrokenInit:
    def __init__(self):
        raise RuntimeError("cannot construct")


def send_then_exit(h):
    h.send("last words")
