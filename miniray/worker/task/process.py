"""The task process: a worker's child that claims chunks, runs them and completes them.

Started as ``python -m miniray.worker.task FD PROGRESS_FD URGENT_FD`` with a socket to its worker
(read on a clock) and a pipe to hurry it. It joins its memory cgroup, pins its CPUs and
applies its environment before it unpickles anything, then reads the worker's hello (server
URL, worker id, slot, limits) and loops. It talks to Redis itself, so a task's round trip has
no hop through the worker process:

- idle, it registers its slot as idle (with its outcomes), then waits (long, see
  ``miniray.worker.task.idlewait``: it does not wake on a clock) on a second connection
  for a chunk handed to the slot (a lone submit's, whole: nothing to claim) or a wake-up,
  after which it claims (a claim that finds nothing registers the slot again). New work goes
  to the slot that went idle last. Busy, it claims more alongside its completions, keeping
  about 50 ms of work queued here;
- a chunk whose job needs other limits (memory, CPUs) is handed to the worker, which starts a
  process with those limits and sends it there (as it sends chunks after a crash, and every
  chunk on GPU workers, whose claims the worker makes under its GPU lock);
- outcomes go to Redis with the complete script: fast items batched (flushed every
  ``FLUSH_SECONDS``), a slow item's at once. A client on this machine gets the result message
  straight from here first, and the script then counts the outcomes without it
  (``miniray.values.inbox``).

The worker supervises: it is told of every chunk (``claimed``: at once for a chunk with a timeout,
else with the next message) and of every outcome once Redis has it (``done``), so when this process
dies it knows what was held and what was delivered (chunks it has not heard of yet are in the
``wip`` hash, tagged with the slot). Before each item the process writes (chunk seq, item index,
start time) to a shared page, and before each chunk of its own claim the chunk id and job: the
worker enforces timeouts from it and knows which item was running. stdout, stderr and ``logging``
are captured line by line (``miniray.worker.task.output``) into the job's log stream: a thread
streams them while tasks run, and the rest go ahead of the outcomes they belong to.

Worker -> task process::
    ("hello", {url, namespace, worker_id, name, host, ncpus, slot, direct, sig})  (first)
    ("run", [(seq, job, entry, chunk, sha, start, count, skip, spec, nframes)], [(sha, fn)])
        + frames
    ("cancel", job)   ("drop", job, chunk)   ("pause",)   ("resume",)   ("stop",)
Task process -> worker::
    ("claimed", job, spec json, [(seq, entry, chunk, start, count)])
    ("done", [(seq, final, indices, n_ok, n_err)])     outcomes now in Redis
    ("handoff", job, spec json, [(entry, frames)])      claimed, but needs other limits

``indices`` is a range, a list, or None for "every item not reported yet"; ``errors`` maps
an item index to ``(exception, traceback, pid)``; each batch of outcomes carries its items'
start times (one ``list.append`` per item; see ``protocol.item_times``). The result message that goes to the client
is ``protocol.encode_result``'s (values one by one, in parts when big).

Its parts: ``run`` runs a chunk, ``functions`` keeps functions and initializers,
``claims`` makes the round trips with Redis, ``results`` places results, ``logs``
ships log lines, ``page`` lays out the page; ``Runner`` holds the loop, the chunks held,
the worker's messages and the outcomes not sent yet.
"""

from __future__ import annotations

import collections
import ctypes
import logging
import mmap
import os
import pickle
import select
import signal
import sys
import threading
import time
from array import array

from miniray.broker import parse_claim
from miniray.config import settings
from miniray.errors import MinirayError
from miniray.keys import Keys
from miniray.values import shm
from miniray.worker.isolation import Leftovers, become_subreaper
from miniray.worker.jobspec import chunk_head, parse_spec

from .claims import Claims
from .functions import Functions
from .logs import LogShipper
from .output import Capture, LogHandler
from .page import JOB_BYTES, PAGE_SIZE, PROGRESS
from .results import ResultPacker
from .run import FLUSH_SECONDS, CancelInterrupt, run_chunk


def _send(conn, lock, obj) -> None:
    data = pickle.dumps(obj, protocol=5)
    with lock:
        conn.send_bytes(data)


class _Work:
    """A chunk this process holds: claimed by itself, or sent by its worker."""

    __slots__ = ("seq", "job", "entry", "chunk", "sha", "start", "count", "frames", "spec",
                 "skip", "missing", "taken")

    def __init__(self, seq, job, entry, chunk, sha, start, count, frames, spec, skip=()):
        self.seq, self.job, self.entry, self.chunk = seq, job, entry, chunk
        self.sha, self.start, self.count, self.frames = sha, start, count, frames
        self.spec, self.skip, self.missing = spec, skip, None
        self.taken = time.monotonic()


class Runner:
    """The task process: its loop, its chunks, its worker's messages and its outcomes."""

    def __init__(self, conn, progress: mmap.mmap, hello: dict, urgent_fd: int = -1):
        self.conn, self.progress = conn, progress
        self.urgent_fd = urgent_fd  # a byte here has the worker read now (see handoff)
        if urgent_fd >= 0:
            os.set_blocking(urgent_fd, False)
        # the shared page as (seq, index, start, flags) views: cheaper than struct per item
        self.prog_i = memoryview(progress).cast("q")
        self.prog_t = memoryview(progress).cast("d")
        self.page_job = b""  # the job written on the page now
        self.lock = threading.Lock()
        self.functions = Functions()  # the jobs' functions and initializers (see functions.py)
        self.seq, self.idx = -1, -1
        self.block = None  # the items' block running now (see itemblocks.py), or None
        self.pending: dict = {}  # job -> ([header], [batch]) not yet completed
        self.last_flush = time.monotonic()
        self.hello = hello
        self.shm_read = False  # a chunk read arguments from shared memory: sweep after it
        self.queue: collections.deque[_Work] = collections.deque()
        self.held: dict[int, _Work] = {}  # seq -> work until its final outcome is in Redis
        self.next_seq = 1 << 40  # seqs of our own claims; the worker's are small
        # False: paused (by the worker, or after a handoff)
        self.claiming = hello["direct"] and hello.get("claiming", True)
        self.cancelled: set = set()
        self.dropped: set = set()  # (job, chunk id): stopped by its client, not to run
        self.specs: dict = {}  # spec json -> dict
        self.notes: list = []  # for the worker, sent with the next one
        self.poller = select.poll()
        self.poller.register(conn.fileno(), select.POLLIN)
        self.stopped = False
        self.in_task = False  # SIGINT interrupts user code only, never a Redis round trip
        self.settings = s = settings()
        self.claims = Claims(self, hello, s)  # its connections to Redis (see claims.py)
        keys = self.claims.broker.keys
        self.logs = LogShipper(hello, keys, s)  # captured lines' way out (see logs.py)
        self.results = ResultPacker(self.claims.r, keys, hello, s)  # (see results.py)
        self.registered = False  # in the idle zset, as far as we know
        self.expect_more = False  # the last claim took all it asked for (see report_and_wait)
        self.fn_key = keys.fn
        self.leftovers = Leftovers()  # processes a task left running (see miniray.worker.isolation)

    # -- log lines ------------------------------------------------------------------------
    def log(self, stream: str, lines) -> None:
        """Queue captured lines for the job's log stream (any thread may call this)."""
        w = self.held.get(self.seq)
        if w is None:
            return  # printed outside any task (a thread the task left behind)
        block = self.block
        idx = block.item() if block is not None else self.idx
        task = w.start + idx if idx >= 0 else ""
        self.logs.ship([(w.job, task, stream, t) for t in lines])

    # -- messages from the worker ---------------------------------------------------------

    def tell_worker(self, note=None) -> None:
        """Send ``note`` and the notes waiting, in one message (one wake-up, not several)."""
        if note is not None:
            self.notes.append(note)
        notes, self.notes = self.notes, []
        _send(self.conn, self.lock, notes[0] if len(notes) == 1 else ("batch", notes))

    def hurry_worker(self) -> None:
        """Have the worker read what it was told now, not at its next tick."""
        if self.urgent_fd >= 0:
            try:
                os.write(self.urgent_fd, b"!")
            except OSError:  # full (it will read anyway) or gone
                pass

    def drain_worker(self) -> None:
        while not self.stopped and self.poller.poll(0):  # (Connection.poll builds a
            self.from_worker()  # selector each call: too slow for every loop)

    def from_worker(self) -> None:
        try:
            msg = pickle.loads(self.conn.recv_bytes())
        except (EOFError, OSError):
            self.stopped = True
            return
        kind = msg[0]
        if kind == "run":
            _, specs, fns = msg
            for sha, data in fns:
                self.functions.pickled[sha] = data
            works = []
            for seq, job, entry, chunk, sha, start, count, skip, spec, nframes in specs:
                frames = [self.conn.recv_bytes() for _ in range(nframes)]
                works.append(_Work(seq, job, entry, chunk, sha, start, count, frames, spec,
                                   skip))
            self.queue.extend(works)
        elif kind == "cancel":
            self.cancelled.add(msg[1])
        elif kind == "drop":
            if len(self.dropped) > 4096:  # (old ones: the worker tells again what it holds)
                self.dropped.clear()
            self.dropped.add((msg[1], msg[2]))
        elif kind == "pause":
            self.claiming = False
        elif kind == "resume":
            self.claiming = self.hello["direct"]
        elif kind == "stop":
            self.stopped = True

    # -- claimed chunks --------------------------------------------------------------------
    def accept(self, claimed: list, want: int = 0) -> None:
        """Take claimed chunks. The worker hears of them with the next message (with their
        outcomes, usually): until then the page names the chunk running, and the ``wip`` hash
        in Redis the rest, which is all the worker needs if this process dies. A chunk with a
        timeout is told at once: the worker enforces it from its spec."""
        self.registered = False  # a claim that takes work ends a registration as idle
        job, spec_raw, chunks = parse_claim(claimed)
        if want and len(chunks) >= want:
            self.expect_more = True  # it took all it asked for: more is likely queued
        spec, bad = self.specs.get(spec_raw), None
        if spec is None:
            try:
                spec = self.specs[spec_raw] = parse_spec(spec_raw, job)
            except MinirayError as e:  # every chunk fails with it; nothing runs
                spec, bad = {}, e
        if not self.fits(spec):  # another job's limits: a process of their own runs it
            self.claiming = False
            # after the notes still waiting (outcomes the worker must hear of: it changes
            # the process only once everything this one held is done)
            self.tell_worker(("handoff", job, spec_raw,
                              [(entry, frames) for entry, _, frames in chunks]))
            self.hurry_worker()  # the slot waits for it to change processes
            return
        works, notes = [], []
        for entry, chunk, frames in chunks:
            seq = self.next_seq
            self.next_seq += 1
            try:
                if bad is not None:
                    raise bad
                head, frames = chunk_head(job, entry, chunk, frames)
                w = _Work(seq, job, entry, chunk, head.fn_sha, head.start, head.count, frames,
                          spec)
            except MinirayError as e:  # another protocol version, or garbage: it fails
                # (its item count from the queue entry: the failure counts every item)
                w = _Work(seq, job, entry, chunk, None, 0, Keys.parse_entry(entry)[2], None,
                          spec)
                w.missing = e
            works.append(w)
            notes.append((seq, entry, chunk, w.start, w.count))
        self.notes.append(("claimed", job, spec_raw, notes))
        if spec.get("timeout") or len(job.encode()) > JOB_BYTES:
            self.tell_worker()
        self.functions.fetch(works, self.claims.redis, self.fn_key)
        self.queue.extend(works)

    def fits(self, spec: dict) -> bool:
        mem, ncpus, ngpus = self.hello["sig"]
        return (spec.get("memory_bytes") == mem and (spec.get("cpus") or 0) == ncpus
                and (spec.get("gpus") or 0) == ngpus)

    def flush(self, claim: bool = True, wait: bool = False) -> None:
        """Complete what finished (one script call per job) and, if wanted, claim more.

        With ``wait`` (nothing is queued here) it then waits (``report_and_wait``): a slot
        about to wait registers as idle with its outcomes, atomically with seeing no work
        queued, or wakes itself when there is some (see ``Broker.idle``); a claim that finds
        nothing registers it too. Registered already and with nothing to report, it goes
        straight to the wait."""
        in_task, self.in_task = self.in_task, False
        pending, self.pending = self.pending, {}
        h, s, broker = self.hello, self.settings, self.claims.broker
        calls, notes = [], []
        for job, (heads, batches) in pending.items():
            chunks, header = [], []
            for seq, final, indices, n_ok, n_err in heads:
                w = self.held[seq]
                if n_err < 0:  # the whole chunk failed before its first item
                    n_err = w.count - len(w.skip)
                chunks.append((w.entry, n_ok, n_err, final))
                header.append((w.chunk, final))
                notes.append((seq, final, indices, n_ok, n_err))
                if final:
                    del self.held[seq]
            # (sent straight to a client on this machine: no message, see results.py)
            chunks, msg = self.results.message(job, w.spec, header, batches, chunks)
            calls.append((job, chunks, msg))
        want = (self.claims.target - len(self.queue)) if claim and self.claiming else 0
        lines = self.logs.take()  # lines a task printed land before its outcome

        def report(pipe):
            self.logs.xadd_logs(pipe, lines)
            idle = self.claims.waiter if wait and not self.registered else ""
            for i, (job, chunks, msg) in enumerate(calls, 1):  # the last one goes idle too
                broker.complete(pipe, h["worker_id"], job, chunks, s.result_ttl_seconds,
                                s.event_stream_maxlen, msg, idle if i == len(calls) else "")
            if idle and not calls:
                broker.idle(pipe, self.claims.waiter)

        def fill(pipe):
            report(pipe)
            if want > 0:
                self.claims.claim(pipe, want)
        handed = claimed = None
        try:
            if wait:
                want = max(1, want)
                handed, claimed, self.registered = self.claims.report_and_wait(report, want,
                                                                               self.expect_more)
            else:
                res = self.claims.redis(fill) if calls or want > 0 or lines else []
                claimed = res[-1] if want > 0 and res else None
        finally:
            self.logs.release()
        self.last_flush = time.monotonic()
        if notes:  # goes with the news of what was claimed, if anything was
            self.notes.append(("done", notes))
        if want > 0:
            self.expect_more = False  # until a claim takes all it asks for (accept)
        if handed:
            self.accept(handed)
        if claimed:
            self.accept(claimed, want)
        if self.notes and not (handed or claimed):
            self.tell_worker()
        self.in_task = in_task

    # -- running --------------------------------------------------------------------------
    def serve(self) -> None:
        while True:
            self.drain_worker()
            if self.stopped:
                return
            if self.queue:
                self.run_work(self.queue.popleft())
                if self.queue and time.monotonic() - self.last_flush >= FLUSH_SECONDS:
                    self.flush()
            elif self.claiming:
                if self.leftovers.due():  # (off the result's path: a later round if need be)
                    self.leftovers.settle()
                # idle: complete what is done, then wait for work and claim, in one round
                # trip; the worker hears of the outcomes when it returns (they are safe in
                # Redis, and a process that dies idle has nothing running to blame)
                self.flush(wait=True)
            elif self.pending:
                self.flush()
            else:
                self.leftovers.settle()  # (it may wait long for the next chunk)
                self.from_worker()  # blocks until the worker says something

    def run_work(self, w: _Work) -> None:
        self.held[w.seq] = w
        if w.seq >= 1 << 40:  # our own claim: the worker may not know it yet (see accept)
            job = w.job.encode()
            if job != self.page_job:
                at = PROGRESS.size
                self.progress[at : at + JOB_BYTES] = job.ljust(JOB_BYTES, b"\0")[:JOB_BYTES]
                self.page_job = job
            self.prog_i[4] = w.chunk
        if w.job in self.cancelled or (self.dropped and (w.job, w.chunk) in self.dropped):
            from miniray.errors import JobCancelledError

            err = JobCancelledError(f"job {w.job} was cancelled before this task ran")
            self.add(w.job, w.seq, True, None, [], {-1: (err, "", os.getpid())}, 0, -1)
        elif w.missing is not None:
            self.add(w.job, w.seq, True, None, [], {-1: (w.missing, "", os.getpid())}, 0, -1)
        else:
            keep = w.spec.get("keep_children", False)
            if keep:
                self.leftovers.settle()
            run_chunk(self, w.seq, w.job, w.sha, w.skip, w.spec.get("env"), w.frames,
                      w.spec.get("init"), w.spec)
            self.leftovers.after_chunk(keep)
        w.frames = None
        # time since it was taken, waiting here included: a queue that makes chunks wait
        # long is cut back, so other workers get a share of a short job
        self.claims.learn(w.job, time.monotonic() - w.taken, w.count)

    def add(self, group, seq, final, indices, values, errors, n_ok, n_err,
            times=None) -> None:
        """Queue outcomes for the next flush; ``times``: the wall-clock offset, each value's
        start and the last one's end (see ``protocol.item_times``)."""
        if errors:
            for i, (exc, tb, pid) in errors.items():
                if type(exc) is CancelInterrupt:  # the item was cancelled, it did not fail
                    from miniray.errors import JobCancelledError

                    errors[i] = (JobCancelledError(
                        f"job {group} was cancelled while this task was running"), "", pid)
        heads, batches = self.pending.setdefault(group, ([], []))
        heads.append((seq, final, indices, n_ok, n_err))
        batches.append((indices, values, errors, array("d", times).tobytes() if times else None))


def _set_pdeathsig() -> None:
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    fd, progress_fd = int(argv[0]), int(argv[1])
    urgent_fd = int(argv[2]) if len(argv) > 2 else -1
    for inherited in (fd, progress_fd, urgent_fd):  # a kept daemon must not hold them open
        if inherited >= 0:
            os.set_inheritable(inherited, False)
    _set_pdeathsig()
    become_subreaper()  # a task's orphans, daemons included, stay ours to kill (see isolation)
    if os.getppid() != int(os.environ.get("MINIRAY_WORKER_PID", os.getppid())):
        sys.exit(0)  # the worker died before we set the death signal
    cgroup = os.environ.pop("MINIRAY_TASK_CGROUP", "")
    rlimit = os.environ.pop("MINIRAY_TASK_RLIMIT_AS", "")
    cpus = os.environ.pop("MINIRAY_TASK_CPUS", "")
    if cgroup:
        from miniray.worker.isolation import MemoryCgroup

        MemoryCgroup.join(cgroup)
    if rlimit:
        from miniray.worker.isolation import apply_rlimit_as

        apply_rlimit_as(int(rlimit))
    if cpus:
        from miniray.worker.isolation import pin_cpus

        pin_cpus([int(c) for c in cpus.split(",")])
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    progress = mmap.mmap(progress_fd, PAGE_SIZE)
    try:
        hello = pickle.loads(conn.recv_bytes())[1]
    except (EOFError, OSError):
        return
    runner = Runner(conn, progress, hello, urgent_fd)
    shm.sweep()  # what a killed task process (the one this replaces?) left in shared memory

    def on_sigint(signum, frame):  # the worker interrupts a task of a cancelled job (or
        # a chunk its client stopped)
        if runner.in_task:  # (elsewhere it is dropped: the kill after the grace follows)
            raise CancelInterrupt

    signal.signal(signal.SIGINT, on_sigint)
    cap = runner.settings.log_line_max_bytes
    sys.stdout = Capture(runner.log, "stdout", cap)
    sys.stderr = Capture(runner.log, "stderr", cap)
    root = logging.getLogger()
    root.addHandler(LogHandler(runner.log, cap))
    if root.level == logging.WARNING:
        root.setLevel(logging.INFO)
    runner.serve()
    runner.leftovers.kill_all()  # kept children live as long as this process, no longer

