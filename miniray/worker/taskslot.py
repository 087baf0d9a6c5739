"""The worker's handle on one task process: spawn, greet, feed chunks, read notes, kill, explain death."""

from __future__ import annotations

import collections
import mmap
import os
import pickle
import select
import signal
import socket
import struct
import subprocess
import sys
import time
from multiprocessing.connection import Connection

from miniray.values import shm
from miniray.worker.task.page import JOB_BYTES, PAGE_SIZE, PROGRESS

from .gpu import visible_devices
from .isolation import MemoryCgroup, kill_tree

__all__ = ["TaskProcess", "ProcKey"]

ProcKey = tuple  # (memory_bytes | None, cpus tuple, gpus tuple | None)


class TaskProcess:
    """A ``python -m miniray.worker.task`` child with its socket, progress page and cgroup."""

    def __init__(self, key: ProcKey, name: str, env: dict | None = None,
                 hello: dict | None = None, gpu_names: dict | None = None):
        self.key = key
        memory_bytes, cpus, gpus = key
        parent_sock, child_sock = socket.socketpair()
        self._progress_fd = _shared_page(PAGE_SIZE)
        self.progress_map = mmap.mmap(self._progress_fd, PAGE_SIZE)
        PROGRESS.pack_into(self.progress_map, 0, -1, -1, 0.0, 0, -1)
        self.cgroup = None
        self.rlimit = False
        child_env = dict(os.environ if env is None else env)
        child_env["MINIRAY_WORKER_PID"] = str(os.getpid())
        if memory_bytes:
            self.cgroup = MemoryCgroup.create(f"{name}-{os.getpid()}-{id(self):x}", memory_bytes)
            if self.cgroup is not None:
                child_env["MINIRAY_TASK_CGROUP"] = self.cgroup.path
            else:
                self.rlimit = True
                child_env["MINIRAY_TASK_RLIMIT_AS"] = str(memory_bytes)
        if cpus:
            child_env["MINIRAY_TASK_CPUS"] = ",".join(map(str, cpus))
        # A task that asked for no GPU must not see one; one that did sees exactly its own,
        # named as the worker was given them (UUIDs stay UUIDs: see miniray.worker.gpu)
        child_env["CUDA_VISIBLE_DEVICES"] = visible_devices(gpus, gpu_names)
        # ... numbered as NVML numbers them (CUDA's default order can differ on mixed nodes)
        child_env.setdefault("CUDA_DEVICE_ORDER", "PCI_BUS_ID")
        fd = child_sock.fileno()
        # a byte here asks the worker to read now (a handoff), not at its next tick
        self.urgent_fd, urgent_w = os.pipe()
        os.set_blocking(self.urgent_fd, False)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "miniray.worker.task", str(fd), str(self._progress_fd),
                 str(urgent_w)],
                pass_fds=(fd, self._progress_fd, urgent_w), start_new_session=True,
                env=child_env, stdin=subprocess.DEVNULL, close_fds=True,
            )
        finally:
            os.close(urgent_w)
        child_sock.close()
        self._sock = parent_sock  # writes go here, non-blocking (see send_run)
        self.conn = Connection(os.dup(parent_sock.fileno()))
        self._inbox: collections.deque = collections.deque()  # read while we were sending
        self.known_fns: set[str] = set()
        self.started = time.monotonic()
        self.killed_for: str | None = None  # "timeout", "cancel" when we killed it on purpose
        self.paused = False
        self.hello = None
        if hello is not None:
            self.greet(hello)

    def greet(self, hello: dict) -> None:
        """The first message: where the server is, who we are, the limits of this process."""
        self.hello = dict(hello, sig=(self.key[0], len(self.key[1]), len(self.key[2])))
        self.paused = not (self.hello["direct"] and self.hello.get("claiming", True))
        self.tell("hello", self.hello)

    def tell(self, *msg) -> None:
        """A small control message ("cancel", "pause", "resume", "stop")."""
        try:
            self.send_run_raw([pickle.dumps(msg, protocol=5)])
        except (BrokenPipeError, ConnectionResetError, OSError):
            pass  # it died; the worker's loop sees EOF and deals with it

    def pause(self) -> None:
        if not self.paused:
            self.paused = True
            self.tell("pause")

    def resume(self) -> None:
        if self.paused and self.hello and self.hello["direct"]:
            self.paused = False
            self.tell("resume")

    def set_flags(self, flags: int) -> None:
        struct.pack_into("q", self.progress_map, 24, flags)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def send_run(self, specs: list, fns: list, frames: list) -> None:
        """Send chunks (see ``task/process.py``): one control message, then every frame.

        Writes never block while the task process has something to say: when the socket is
        full, what it sent is read into an inbox first. (It may be blocked writing its
        results to us; if we only wrote, both sides would wait for each other.)
        """
        self.send_run_raw([pickle.dumps(("run", specs, fns), protocol=5), *frames])

    def send_run_raw(self, payloads: list) -> None:
        pieces = []
        for payload in payloads:
            n = payload.nbytes if isinstance(payload, memoryview) else len(payload)
            pieces.append(_HEADER.pack(n) if n < 0x7FFFFFFF else _BIG_HEADER.pack(-1, n))
            pieces.append(payload)
        fd = self.conn.fileno()
        for piece in pieces:
            view = memoryview(piece).cast("B")
            while view.nbytes:
                try:
                    view = view[self._sock.send(view, socket.MSG_DONTWAIT):]
                except BlockingIOError:
                    readable, _, _ = select.select([fd], [fd], [])
                    if readable:
                        self._inbox.append(self.conn.recv_bytes())  # EOFError: it died

    def poll(self, timeout: float) -> bool:
        return bool(self._inbox) or self.conn.poll(timeout)

    def wait_message(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s for the process to say something (a message, or a byte on
        its urgent pipe, which is left for ``wait_urgent``); True if it did."""
        if self._inbox:
            return True
        return bool(select.select([self.conn.fileno(), self.urgent_fd], [], [], timeout)[0])

    def wait_urgent(self, timeout: float) -> None:
        """Sleep up to ``timeout`` s, less if the process asks to be heard now."""
        if select.select([self.urgent_fd], [], [], timeout)[0]:
            try:
                while os.read(self.urgent_fd, 4096):
                    pass
            except BlockingIOError:
                pass

    def recv(self):
        """The next message; raises EOFError when the process has died."""
        if self._inbox:
            return pickle.loads(self._inbox.popleft())
        return pickle.loads(self.conn.recv_bytes())

    def progress(self) -> tuple:
        """(chunk seq, item index, monotonic start) of the item running now, or seq -1."""
        return PROGRESS.unpack_from(self.progress_map, 0)[:3]

    def running_chunk(self) -> tuple:
        """(seq, job, chunk id) of the chunk running now, as the page says (job None when
        none runs). For a chunk the process claimed itself and has not told us of yet."""
        for _ in range(3):  # the process may move on while we read: read until it holds still
            seq, _, _, _, chunk = PROGRESS.unpack_from(self.progress_map, 0)
            job = bytes(self.progress_map[PROGRESS.size : PROGRESS.size + JOB_BYTES])
            if PROGRESS.unpack_from(self.progress_map, 0)[0] == seq:
                break
        if seq < 0:
            return seq, None, None
        return seq, job.rstrip(b"\0").decode(errors="replace"), chunk

    def interrupt(self) -> None:
        try:
            os.kill(self.proc.pid, signal.SIGINT)
        except ProcessLookupError:
            pass

    def kill(self, reason: str | None = None) -> None:
        if reason and self.killed_for is None:
            self.killed_for = reason
        kill_tree(self.proc.pid)
        if self.cgroup is not None:
            self.cgroup.kill()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def death(self) -> str:
        """Why the process ended, in words: 'killed by SIGSEGV', 'exited with status 3'."""
        try:
            code = self.proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.kill()
            code = self.proc.wait()
        if code < 0:
            try:
                name = signal.Signals(-code).name
            except ValueError:
                name = f"signal {-code}"
            return f"killed by {name}"
        return f"exited with status {code}"

    def oom_killed(self) -> bool:
        return self.cgroup is not None and self.cgroup.oom_killed()

    def close(self, graceful: bool = True) -> None:
        if graceful and self.alive():
            try:
                self.tell("stop")
                self.proc.wait(timeout=1)
            except Exception:
                pass
        if self.alive():
            self.kill()
        try:
            self.proc.wait(timeout=5)
            shm.sweep_pid(self.proc.pid)  # what it left in shared memory (see miniray.values.shm)
        except subprocess.TimeoutExpired:
            pass
        self.conn.close()
        self._sock.close()
        os.close(self.urgent_fd)
        self.progress_map.close()
        os.close(self._progress_fd)
        if self.cgroup is not None:
            self.cgroup.remove()


_HEADER = struct.Struct("!i")  # multiprocessing.connection's framing, as the task process reads it
_BIG_HEADER = struct.Struct("!iQ")


def _shared_page(size: int) -> int:
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("miniray-progress", 0)
    else:  # pragma: no cover - non-Linux
        import tempfile

        fd, path = tempfile.mkstemp(prefix="miniray-progress-")
        os.unlink(path)
    os.ftruncate(fd, size)
    os.set_inheritable(fd, False)
    return fd
