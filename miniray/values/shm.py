"""Large values between processes of one machine through shared memory, and who frees them.

An out-of-band pickle buffer (``serialization.dumps``, ``protocol.pack_value``) of at least
``MINIRAY_SHM_MIN_BYTES`` bound for a process on this machine is written once into a file
under ``/dev/shm`` (a tmpfs: the file is memory) and the payload carries only a reference
(path and size). The receiver maps it (``mmap``) and unpickles with the buffer pointing into
the mapping: a numpy array is then a view of shared memory, no copy on the receiving side,
no bytes through the server.

Why files in a directory rather than ``memfd_create``: a memfd can be reached from another
process only through ``/proc/<pid>/fd/<n>`` (same user *and* ptrace rights, and only while
its creator lives) or by passing the fd over a unix socket, which needs a connection
between the two that miniray does not have for arguments (they go through the server). A
file in a directory of mode 0700 named ``miniray-shm-<pid namespace>-<pid>-<random>`` is
reachable by this user only, needs no live creator, and its owner is in its name: the
sweep removes the directory of a dead pid. Writing one costs what a memfd costs (tmpfs
pages either way).

Ownership, exactly (the client: an ``Executor``; ``Segments`` is its directory):

* Arguments (client -> task): the client writes ``a-*`` files in its directory; the task
  process maps them read-only (as arguments read from the server are: a re-run must see
  the original). The client unlinks them when its chunk has all its results (``free``), and
  removes the whole directory when the job closes. A chunk's arguments go this way only
  while every live worker sees this ``/dev/shm`` (``ArgumentsHere``: the server is on this
  machine, and each worker's heartbeat names the same ``domain()``); a worker that joins
  from elsewhere (``%miniray ssh`` adds hosts to a local cluster) turns it off within a
  second, and the arguments travel through the server as before.
* Writing again: a fresh tmpfs file costs the kernel's zeroing of every page (about half
  of a 100 MB argument's trip), so ``free`` keeps up to ``POOL_FILES`` argument files for
  ``POOL_IDLE`` seconds and ``place`` writes the next argument into one of them. A task
  process holds a shared ``flock`` on an argument's file for as long as it maps it (the lock
  lives with the mapping's descriptor: it ends when the task drops the argument, or dies); the
  client writes a kept file again only under an exclusive lock taken without waiting, so a
  task that kept its argument (a global, a cache) never sees it change: its file is unlinked
  instead, and its mapping keeps the old pages.
* Results (task -> client): the task process writes into a directory of its own, then
  renames the finished file into the client's directory (the job spec's ``shm`` address,
  used only when the client is on this machine and its directory is visible here) and
  sends the reference, through the inbox or the server. The client maps the file and
  unlinks it at once (``attach``): from then on the mapping alone holds the memory, and it
  lives as long as the value the user holds (POSIX keeps an unlinked file's pages while a
  mapping exists). A message the client drops unread (a duplicate after a retry) leaves
  its file until the job closes.
* Death: a killed task process leaves at most its own directory (a half-written result):
  its worker removes it when it reaps the process (``sweep_pid``); were the worker killed
  too, the next task process to start on this machine, or the next executor, sweeps it
  (its pid is dead). A killed client leaves its directory: swept by the next executor to
  start, and by any task process when it ends a chunk that read shared arguments (then,
  typically, the chunk of the dead client itself).

Kept jobs (``keep=True``) never use shared memory: their results outlive the client and
are read from the server by ``attach``. ``MINIRAY_SHM=0`` turns all of it off.
"""

from __future__ import annotations

import atexit
import fcntl
import mmap
import os
import pickle
import queue
import re
import shutil
import stat
import struct
import tempfile
import threading
import time
import weakref

from miniray.scratch import _pid_namespace, remove_dead

from .inbox import host_id

__all__ = ["ROOT", "Segments", "Ref", "attach", "open_frames", "ResultPlacer", "sweep",
           "stats", "available", "sweep_pid", "domain", "ArgumentsHere"]

ROOT = "/dev/shm"
_NAME = re.compile(r"miniray-shm-(\d+)-(\d+)-[^/]+$")
_MARK = b"\x00miniray-shm\x00"  # an argument frame replaced by a reference: mark, size, path
_SIZE = struct.Struct("!Q")
_POPULATE = getattr(mmap, "MAP_POPULATE", 0)
_MAX_MARK = 4096  # a reference frame is shorter; a real out-of-band frame is far longer

#: bytes this process placed in and attached from shared memory (tests and the bench read it)
stats = {"placed": 0, "attached": 0, "mapped_args": 0, "reused": 0}
_doomed: queue.SimpleQueue = queue.SimpleQueue()  # paths to unlink (see Segments.free)
_unlinker: threading.Thread | None = None
_own: set = set()  # this process's executor directories (only these may be attached from)
_segments: "weakref.WeakSet" = weakref.WeakSet()  # live Segments (their pools are trimmed)
POOL_FILES = 4  # freed argument files an executor keeps to write again (see Segments.free)
POOL_IDLE = 5.0  # seconds a kept file waits to be written again before it is unlinked
_lock = threading.Lock()


def available() -> bool:
    """True where this machine has a writable ``/dev/shm``."""
    return os.path.isdir(ROOT) and os.access(ROOT, os.W_OK | os.X_OK)


_domain: str | None = None


def domain() -> str:
    """Which ``/dev/shm`` this process sees: the machine (its boot id) and the tmpfs mounted
    there (its device; a container with a private ``/dev/shm`` on the same machine has
    another). Processes with the same domain can open each other's files."""
    global _domain
    if _domain is None:
        try:
            dev = os.stat(ROOT).st_dev
        except OSError:
            dev = -1
        _domain = f"{host_id()}/{dev}"
    return _domain


class ArgumentsHere:
    """Whether a chunk's large arguments may go through shared memory now: always with
    ``always`` (``MINIRAY_SHM=2``); else only when the server is on this machine
    (``server_here``) and every live worker (``machines()``: their heartbeats' ``shm``
    fields) shares this process's ``domain()``. Asked only for chunks with a large buffer;
    the workers' answer is kept for ``every`` seconds."""

    def __init__(self, always: bool, server_here: bool, machines, every: float = 1.0):
        self.always, self.server_here, self.machines, self.every = always, server_here, machines, every
        self._ok, self._until = False, 0.0

    def __call__(self) -> bool:
        if self.always:
            return True
        if not self.server_here:
            return False
        now = time.monotonic()
        if now >= self._until:
            here = domain()
            try:
                self._ok = all(m == here for m in self.machines())
            except Exception:  # (the server is unreachable: the send will say so)
                self._ok = False
            self._until = now + self.every
        return self._ok


def _new_dir() -> str:
    return tempfile.mkdtemp(prefix=f"miniray-shm-{_pid_namespace()}-{os.getpid()}-", dir=ROOT)


def _write(path: str, buf, fd: int | None = None) -> None:
    """``buf`` into a new file at ``path`` (mode 0600), once; or, with ``fd`` (open for
    writing, exclusively locked: see ``Segments._reusable``), over the file's old content."""
    view = memoryview(buf).cast("B")
    if fd is None:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600)
    try:
        at, n = 0, view.nbytes
        if os.fstat(fd).st_size != n:
            os.ftruncate(fd, n)
        while at < n:
            at += os.pwrite(fd, view[at:at + (1 << 30)], at)
    except BaseException:
        os.close(fd)
        _unlink(path)
        raise
    os.close(fd)  # (and with it the exclusive lock)


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _unlink_loop() -> None:
    while True:
        try:
            _unlink(_doomed.get(timeout=POOL_IDLE / 2))
        except queue.Empty:
            for seg in list(_segments):
                seg.trim()


def _map(path: str, size: int, writable: bool) -> memoryview:
    """A shared mapping of the file at ``path``, its page tables filled at once (one call
    instead of a fault per few pages: about 10% of a 100 MB argument's trip)."""
    fd = os.open(path, os.O_RDWR if writable else os.O_RDONLY)
    try:
        if not writable:  # an argument: not to be written again while mapped (see the top)
            try:  # (held by the mapping's copy of fd)
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:  # the client writes the next argument there
                raise ValueError(f"{path} is being written again: its chunk had ended") from None
        if os.fstat(fd).st_size != size:
            raise ValueError(f"{path} holds {os.fstat(fd).st_size} bytes, not {size}")
        prot = mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0)
        return memoryview(mmap.mmap(fd, size, flags=mmap.MAP_SHARED | _POPULATE, prot=prot))
    finally:
        os.close(fd)


class Segments:
    """An executor's directory in shared memory: the arguments it sends, the results sent
    to it. ``address`` goes in the job spec (``"<host id>:<directory>"``)."""

    def __init__(self, min_bytes: int):
        sweep()
        self.dir = _new_dir()
        self.address = f"{host_id()}:{self.dir}"
        self.min_bytes = max(1, min_bytes)
        self._pool: list = []  # (monotonic time freed, path): argument files to write again
        self._pool_lock = threading.Lock()
        with _lock:
            _own.add(self.dir)
            _segments.add(self)

    @classmethod
    def open(cls, min_bytes: int) -> "Segments | None":
        """Segments, or None where this machine has no usable ``/dev/shm``."""
        if not available():
            return None
        try:
            return cls(min_bytes)
        except OSError:
            return None

    def place(self, frames: list) -> tuple[list, list]:
        """``frames`` (``serialization.dumps``'s) with each big out-of-band buffer written
        here and replaced by a reference; and the paths written (``free`` them)."""
        out, paths = None, []
        for i in range(1, len(frames)):
            f = frames[i]
            size = memoryview(f).nbytes
            if size < self.min_bytes:
                continue
            path, fd = self._reusable()
            try:
                _write(path, f, fd)
            except OSError:  # full (tmpfs size) or gone: this one through the server
                continue
            if out is None:
                out = list(frames)
            out[i] = _MARK + _SIZE.pack(size) + os.fsencode(path)
            paths.append(path)
            stats["placed"] += size
        return (frames if out is None else out), paths

    def _reusable(self) -> tuple[str, int | None]:
        """A kept argument file that no task maps any more, open and exclusively locked;
        else a new name (and None). Kept files some task still maps are unlinked."""
        while True:
            with self._pool_lock:
                if not self._pool:
                    return os.path.join(self.dir, "a-" + os.urandom(8).hex()), None
                _, path = self._pool.pop()
            try:
                fd = os.open(path, os.O_WRONLY)
            except OSError:
                continue
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # a task keeps its argument: its pages stay as they are
                os.close(fd)
                _doomed.put(path)
                continue
            stats["reused"] += 1
            return path, fd

    def free(self, paths, reuse: bool = False) -> None:
        """Unlink ``paths`` (argument files), or with ``reuse`` (their chunk ended with its
        results) keep up to ``POOL_FILES`` of them to be written again for ``POOL_IDLE``
        seconds; unlinks happen off the caller's thread (freeing 100 MB of
        tmpfs pages takes about 10 ms, and the caller is often a ``result()`` on its way back
        to the user)."""
        global _unlinker
        with _lock:
            if _unlinker is None or not _unlinker.is_alive():
                _unlinker = threading.Thread(target=_unlink_loop, daemon=True,
                                             name="miniray-shm-free")
                _unlinker.start()
        now = time.monotonic()
        for path in paths:
            with self._pool_lock:
                if reuse and len(self._pool) < POOL_FILES:
                    self._pool.append((now, path))
                    continue
            _doomed.put(path)

    def trim(self, idle: float = POOL_IDLE) -> None:
        """Unlink the kept files that waited ``idle`` seconds or more."""
        old = time.monotonic() - idle
        with self._pool_lock:
            stale = [p for t, p in self._pool if t <= old]
            self._pool = [(t, p) for t, p in self._pool if t > old]
        for path in stale:
            _doomed.put(path)

    def close(self) -> None:
        with _lock:
            _own.discard(self.dir)
            _segments.discard(self)
        with self._pool_lock:
            self._pool = []
        shutil.rmtree(self.dir, ignore_errors=True)


def open_frames(frames: list) -> tuple[list, bool]:
    """A task's frames with references mapped, read-only (as the frames read from the server
    are: a task must not change what a re-run would read); and whether any was. A reference whose file is
    gone (its client ended, or the chunk had ended already) raises ``MinirayError``."""
    out, used = None, False
    for i in range(1, len(frames)):
        f = frames[i]
        if len(f) > _MAX_MARK or bytes(f[:len(_MARK)]) != _MARK:
            continue
        (size,) = _SIZE.unpack_from(f, len(_MARK))
        path = os.fsdecode(bytes(f[len(_MARK) + _SIZE.size:]))
        if _NAME.match(os.path.basename(os.path.dirname(path))) is None:
            raise ValueError(f"{path!r} is not in a miniray shared-memory directory")
        try:
            view = _map(path, size, False)
        except (OSError, ValueError) as e:
            from miniray.errors import MinirayError

            raise MinirayError(
                f"this task's argument was in shared memory at {path}, which is gone "
                f"({type(e).__name__}: {e}): its client ended or the task had finished "
                "already (submit it again), or this worker does not see the client's /dev/shm "
                "(another machine or container: MINIRAY_SHM=2 on the client says every worker "
                "does; use 1)") from e
        if out is None:
            out = list(frames)
        out[i] = view
        used = True
        stats["mapped_args"] += size
    return (frames if out is None else out), used


class Ref:
    """A result's buffer in shared memory, as it travels: unpickled, it is ``attach``'s
    mapping of the file."""

    __slots__ = ("path", "size")

    def __init__(self, path: str, size: int):
        self.path, self.size = path, size

    def __reduce__(self):
        return attach, (self.path, self.size)


def attach(path: str, size: int) -> memoryview:
    """Map a result's file (sent to one of this process's executors) and unlink it: the
    receiver has it, the mapping holds it from now on."""
    if os.path.dirname(path) not in _own:
        raise ValueError(
            f"a result in shared memory at {path}, which is not a directory of an executor "
            "of this process (was the value re-sent from elsewhere?)")
    try:
        view = _map(path, size, True)  # (unlinked next: private in effect)
    finally:
        _unlink(path)
    stats["attached"] += size
    return view


class ResultPlacer:
    """The task process's end for results: ``sink(buf)`` writes a big buffer for the client
    at ``address`` (a job spec's ``shm``) and returns its ``Ref``, else ``buf`` itself."""

    _dir: str | None = None  # this process's own directory: half-written results

    def __init__(self, address: str | None, min_bytes: int):
        self.target = None
        if address and address.startswith(host_id() + ":"):
            target = address[len(host_id()) + 1:]
            if _NAME.match(os.path.basename(target)) is not None:
                try:
                    st = os.stat(target)
                    if stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid():
                        self.target = target
                except OSError:
                    pass  # another machine's /dev/shm (a container): through the server
        self.min_bytes = max(1, min_bytes)

    def sink(self, buf):
        if self.target is None:
            return buf
        raw = buf.raw() if isinstance(buf, pickle.PickleBuffer) else buf
        size = memoryview(raw).nbytes
        if size < self.min_bytes:
            return buf
        name = "r-" + os.urandom(8).hex()
        try:
            own = ResultPlacer._own_dir()
            tmp = os.path.join(own, name)
            _write(tmp, raw)
            try:
                os.rename(tmp, os.path.join(self.target, name))  # the client owns it now
            except OSError:
                _unlink(tmp)
                raise
        except OSError:  # the client is gone, or /dev/shm is full: through the server
            return buf
        stats["placed"] += size
        return Ref(os.path.join(self.target, name), size)

    @classmethod
    def _own_dir(cls) -> str:
        if cls._dir is None or not os.path.isdir(cls._dir):
            cls._dir = _new_dir()
            atexit.register(shutil.rmtree, cls._dir, True)
        return cls._dir


def sweep_pid(pid: int) -> None:
    """Remove what process ``pid`` (ended: its parent has reaped it) left in shared memory."""
    prefix = f"miniray-shm-{_pid_namespace()}-{pid}-"
    try:
        names = [n for n in os.listdir(ROOT) if n.startswith(prefix)]
    except OSError:
        return
    for name in names:
        shutil.rmtree(os.path.join(ROOT, name), ignore_errors=True)


def sweep() -> int:
    """Remove the shared-memory directories of this user's dead miniray processes (same pid
    namespace only); return how many. Cheap: one listing of ``/dev/shm``."""
    return remove_dead(ROOT, _NAME)
