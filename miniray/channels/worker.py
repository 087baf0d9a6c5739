"""``Worker``: a forked child process joined to its parent by a socketpair channel.

The parent keeps one end of a ``socket.socketpair()``; the child runs ``fn(handle)`` with the
other and exits with status 0 when ``fn`` returns, 1 when it raises (the traceback goes to the
child's stderr). The child asks the kernel for SIGKILL when the parent dies, so a crashed
notebook never leaves orphans behind.
"""

import os
import signal
import socket
import sys
import time
import traceback
import weakref

from miniray.errors import ChannelClosedError, WorkerDiedError

from .framing import DEFAULT_MAX_SIZE, Channel, get_codec, set_pdeathsig, wait_readable

# Parent ends of live workers. A later fork inherits them; the child closes its copies so that
# a worker never keeps a sibling's channel open (which would hide that sibling's EOF).
_PARENT_ENDS = weakref.WeakSet()


class Worker(Channel):
    """Fork a process that runs ``fn(handle)``; talk to it with ``send``/``recv``.

    >>> def echo(h):
    ...     while True:
    ...         h.send(h.recv())
    >>> with Worker(echo) as w:
    ...     w.send([1, 2]); w.recv(timeout=5)
    [1, 2]

    ``env`` updates the child's environment before ``fn`` runs. ``codec`` is ``"json"``,
    ``"marshal"`` or ``"pickle"`` (cloudpickle: lambdas and closures travel). Messages larger
    than ``max_size`` bytes are refused on both ends with ``FrameTooLargeError``.
    """

    def __init__(self, fn, *, env=None, codec="json", max_size=DEFAULT_MAX_SIZE):
        get_codec(codec)  # fail in the parent, not silently in the child
        parent_sock, child_sock = socket.socketpair()
        ppid = os.getpid()
        # Flush so buffered parent output is not written twice, once by each process.
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - runs in the child, which leaves through os._exit
            parent_sock.close()
            _child_main(fn, child_sock, ppid, env, codec, max_size)
        child_sock.close()
        super().__init__(parent_sock, codec=codec, max_size=max_size)
        self.pid = pid
        self._exitcode = None
        _PARENT_ENDS.add(self)

    def __repr__(self):
        state = "alive" if self.is_alive() else f"exitcode={self._exitcode}"
        return f"<Worker pid={self.pid} codec={self.codec} {state}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def exitcode(self):
        """None while running; the exit status, or minus the signal that killed it."""
        self._reap(block=False)
        return self._exitcode

    def is_alive(self):
        return self.exitcode is None

    def wait(self, timeout=None):
        """Wait for the child to exit and return its exit code (``TimeoutError`` if it doesn't)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        delay = 0.0005
        while not self._reap(block=deadline is None):
            if time.monotonic() >= deadline:
                raise TimeoutError(f"worker pid {self.pid} still running after {timeout}s")
            time.sleep(delay)
            delay = min(delay * 2, 0.05)
        return self._exitcode

    def kill(self, sig=signal.SIGKILL):
        """Send ``sig`` (default SIGKILL) and, for SIGKILL, reap the child."""
        if self._reap(block=False):
            return
        try:
            os.kill(self.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            self.wait()

    def close(self, timeout=1.0):
        """Close the channel; a child that does not exit within ``timeout`` is killed."""
        super().close()
        try:
            self.wait(timeout)
        except TimeoutError:
            self.kill()

    def _reap(self, block):
        if self._exitcode is not None:
            return True
        try:
            pid, status = os.waitpid(self.pid, 0 if block else os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere (e.g. a SIGCHLD handler): status unknown
            self._exitcode = -1
            return True
        if pid == 0:
            return False
        self._exitcode = os.waitstatus_to_exitcode(status)
        return True

    def _closed_error(self, detail):
        # EOF from the child almost always means it is exiting: give it a moment to be reaped
        # so the error can say how it died.
        try:
            code = self.wait(1.0)
        except TimeoutError:
            code = None
        if code is None:
            how = "closed its end of the channel"
        elif code < 0:
            how = f"was killed by signal {signal.Signals(-code).name}"
        else:
            how = f"exited with code {code}"
        return WorkerDiedError(f"worker pid {self.pid} {how} ({detail})", exitcode=code)


def wait_any(workers, timeout=None):
    """Return the workers that have a message (or have died) ready; ``[]`` after ``timeout``."""
    return wait_readable(list(workers), timeout)


def _child_main(fn, sock, ppid, env, codec, max_size):  # pragma: no cover - child side
    def body():
        for other in list(_PARENT_ENDS):
            other._sock.close()  # close only our copy: shutdown() would cut the parent's too
        _PARENT_ENDS.clear()
        if env:
            os.environ.update({k: str(v) for k, v in env.items()})
        fn(Channel(sock, codec=codec, max_size=max_size))

    run_child(body, ppid)


def run_child(body, ppid):  # pragma: no cover - child side
    """Run ``body()`` in a freshly forked child and leave through ``os._exit``, never returning.

    Exit status: 0 when ``body`` returns or the parent closed the channel (the normal way to
    stop a worker loop), the ``SystemExit`` code, else 1 with the traceback on stderr.
    """
    code = 1
    try:
        set_pdeathsig(signal.SIGKILL)
        if os.getppid() != ppid:  # the parent died before prctl took effect
            os._exit(1)
        body()
        code = 0
    except ChannelClosedError:
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    except BaseException:
        traceback.print_exc()
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)
