"""``WorkerServer``: a TCP server that forks one worker per authenticated connection.

Also the ``miniray serve`` command (``main(argv)``; ``python -m miniray.channels.server``).
The accept loop keeps, for every child, a pidfd (to reap it the moment it exits) and a copy of
its connection (to kill it the moment the client hangs up, so ``RemoteWorker.kill()`` and a
crashed client both end the remote process even while it is busy computing).
"""

import argparse
import importlib
import ipaddress
import logging
import os
import select
import signal
import socket
import sys

from miniray.errors import ChannelError

from .framing import DEFAULT_MAX_SIZE, Channel
from .handshake import LISTENING, SECRET_PROMPT, server_handshake
from .worker import run_child

log = logging.getLogger(__name__)


def resolve_function(spec):
    """``"pkg.module.fn"`` or ``"pkg.module:fn"`` -> the function object."""
    if callable(spec):
        return spec
    module, sep, name = spec.partition(":")
    if not sep:
        module, _, name = spec.rpartition(".")
    if not module or not name:
        raise ValueError(f"work_fn {spec!r} should look like 'package.module.function'")
    try:
        return getattr(importlib.import_module(module), name)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load work_fn {spec!r}: {e}; is its module on PYTHONPATH?") from e


def is_loopback(host):
    """True if every address ``host`` resolves to is a loopback address."""
    try:
        infos = socket.getaddrinfo(host, None)
    except socket.gaierror:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)


class WorkerServer:
    """Listen on ``host:port``; each authenticated connection gets a forked ``work_fn(handle)``.

    >>> server = WorkerServer("127.0.0.1", 0, work_fn="mypkg.workers.echo")  # doctest: +SKIP
    >>> server.serve_forever()                                                # doctest: +SKIP

    ``secret`` is required on any non-loopback address: whoever passes the handshake can run
    ``work_fn`` and, with the pickle codec, any code.
    """

    def __init__(self, host="127.0.0.1", port=0, work_fn=None, *, secret=None,
                 max_size=DEFAULT_MAX_SIZE, handshake_timeout=10.0):
        if work_fn is None:
            raise ValueError("WorkerServer needs work_fn='package.module.function'")
        if secret is None and not is_loopback(host):
            raise ValueError(
                f"refusing to listen on non-loopback address {host!r} without a secret: anyone "
                "who can reach it could run code. Pass secret= (or --secret-file/--secret-stdin)"
            )
        self.work_fn = resolve_function(work_fn)
        self._secret = secret
        self.max_size = max_size
        self.handshake_timeout = handshake_timeout
        self._listener = socket.create_server((host, port), backlog=128)
        self.address = self._listener.getsockname()[:2]
        self._children = {}  # pid -> (pidfd or None, connection copy)
        self._stopping = False

    def __repr__(self):  # never shows the secret
        return (f"<WorkerServer {self.address[0]}:{self.address[1]} "
                f"auth={'on' if self._secret is not None else 'off'} "
                f"children={len(self._children)}>")

    def serve_forever(self, poll_interval=0.5):
        """Accept and fork until ``shutdown()``; children die with the server (PDEATHSIG)."""
        poller = select.poll()
        poller.register(self._listener, select.POLLIN)
        watched = {self._listener.fileno(): ("listen", None)}
        try:
            while not self._stopping:
                for fd, _ in poller.poll(poll_interval * 1000):
                    kind, pid = watched.get(fd, (None, None))
                    if kind == "listen":
                        pid, fds = self._accept()
                        if pid is not None:
                            for k, f, mask in fds:
                                watched[f] = (k, pid)
                                poller.register(f, mask)
                    elif kind is not None:
                        if kind == "conn":  # the client hung up: the worker must go too
                            _kill(pid)
                        self._reap(pid, poller, watched)
                for pid in list(self._children):  # fallback for kernels without pidfd
                    if self._children[pid][0] is None:
                        self._reap(pid, poller, watched, block=False)
        finally:
            self._listener.close()
            for pid in list(self._children):
                _kill(pid)
                self._reap(pid, poller, watched)

    def shutdown(self):
        """Make ``serve_forever`` return at its next wake-up (safe from a signal handler)."""
        self._stopping = True

    def _accept(self):
        try:
            conn, _ = self._listener.accept()
        except OSError:
            return None, ()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        ppid = os.getpid()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - child
            self._listener.close()
            for _, c in self._children.values():
                c.close()
            run_child(lambda: self._serve_connection(conn), ppid)
        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):
            pidfd = None
        self._children[pid] = (pidfd, conn)
        fds = [("conn", conn.fileno(), select.POLLRDHUP)]
        if pidfd is not None:
            fds.append(("pid", pidfd, select.POLLIN))
        return pid, fds

    def _serve_connection(self, conn):  # pragma: no cover - child
        conn.settimeout(self.handshake_timeout)
        try:
            opts = server_handshake(conn, self._secret, self.max_size)
        except (ChannelError, OSError, ValueError) as e:
            log.warning("rejected connection: %s", e)
            os._exit(2)
        conn.settimeout(None)
        os.environ.update({str(k): str(v) for k, v in opts["env"].items()})
        self.work_fn(Channel(conn, codec=opts["codec"], max_size=opts["max_size"]))

    def _reap(self, pid, poller, watched, block=True):
        try:
            done, _ = os.waitpid(pid, 0 if block else os.WNOHANG)
        except ChildProcessError:
            done = pid
        if done == 0:
            return
        pidfd, conn = self._children.pop(pid)
        for fd in (conn.fileno(), pidfd):
            if fd is not None and fd in watched:
                poller.unregister(fd)
                del watched[fd]
        conn.close()  # our copy: now the client sees EOF
        if pidfd is not None:
            os.close(pidfd)


def _kill(pid):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _read_secret(args):
    if args.secret_file:
        with open(args.secret_file) as f:
            return f.read().strip()
    if args.secret_stdin:
        if sys.stdin.isatty():  # under an SSH pty: keep the secret out of the echoed output
            import termios

            attrs = termios.tcgetattr(sys.stdin)
            attrs[3] &= ~termios.ECHO
            termios.tcsetattr(sys.stdin, termios.TCSANOW, attrs)
        print(SECRET_PROMPT, flush=True)
        return sys.stdin.readline().strip()
    return None


def main(argv=None):
    """``miniray serve``: run a WorkerServer in the foreground until interrupted."""
    p = argparse.ArgumentParser(prog="miniray serve", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default loopback)")
    p.add_argument("--port", type=int, default=0, help="0 picks a free port (printed)")
    p.add_argument("--work-fn", required=True, help="package.module.function run per connection")
    p.add_argument("--secret-file", help="file holding the shared secret")
    p.add_argument("--secret-stdin", action="store_true", help="read the secret from stdin")
    p.add_argument("--max-size", type=int, default=DEFAULT_MAX_SIZE, help="frame size cap")
    args = p.parse_args(argv)
    try:
        server = WorkerServer(args.host, args.port, args.work_fn, secret=_read_secret(args),
                              max_size=args.max_size)
    except (ValueError, OSError) as e:
        print(f"miniray serve: {e}", file=sys.stderr)
        return 2
    # SystemExit unwinds through serve_forever's cleanup at once, without waiting for a poll.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    host, port = server.address
    print(f"{LISTENING} {host} {port} {os.getpid()}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
