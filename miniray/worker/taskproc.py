"""The task process: a worker's child that claims chunks, runs them and completes them.

Started as ``python -m miniray.worker.taskproc FD PROGRESS_FD URGENT_FD`` with a socket to its worker
(read on a clock) and a pipe to hurry it. It joins its memory cgroup, pins its CPUs and
applies its environment before it unpickles anything, then reads the worker's hello (server
URL, worker id, slot, limits) and loops. It talks to Redis itself, so a task's round trip has
no hop through the worker process:

- idle, it registers its slot as idle (with its outcomes), then waits (long, see
  ``miniray.worker.idlewait``: it does not wake on a clock) on a second connection
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

The worker supervises: it is told of every chunk (``claimed``: at once for a chunk with a
timeout, else with the next message) and of every outcome once Redis has it (``done``), so
when this process dies it knows what was held and what was delivered (chunks it has not heard
of yet are in the ``wip`` hash, tagged with the slot). Before each item the process writes
(chunk seq, item index, start time) to a shared page, and before each chunk of its own claim
the chunk id and job: the worker enforces timeouts from it and knows which item was running.
stdout, stderr and ``logging`` are captured line by line (``miniray.worker.taskoutput``) into the job's
log stream: a thread streams them while tasks run, and the rest go ahead of the outcomes they
belong to.

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
"""

from __future__ import annotations

import collections
import ctypes
from array import array
import functools
import logging
import mmap
import os
import pickle
import select
import signal
import struct
import sys
import threading
import time
import types

from . import idlewait
from . import itemblocks
from miniray.broker import Broker, connect, parse_claim
from miniray.config import settings
from miniray.errors import MinirayError, PayloadTooLargeError
from miniray.values.inbox import Sender
from miniray.values import bigvalues
from miniray.values import shm
from .isolation import Leftovers, become_subreaper
from .jobspec import bad_payload, chunk_head, malformed, parse_spec
from miniray.keys import Keys
from miniray.protocol import ResultHeader, encode_batches, encode_result
from miniray.values.payloads import BIG, SMALL_PART, big_part_size, check_room
from miniray.resp import ConnectionLost, NoScriptError, RedisError
from .taskoutput import Capture, LogHandler, end_lines
from miniray.tracebacks import task_traceback

# The page shared with the worker: chunk seq and item index running now (-1: none), its
# monotonic start time, flags the worker sets (bit 0: its Triton server is healthy), and the
# chunk id and job (UTF-8, NUL-padded, after the struct) of the chunk running now: a chunk
# this process claimed itself may run before the worker has heard of it (see accept).
PROGRESS = struct.Struct("qqdqq")
JOB_BYTES = 96
PAGE_SIZE = PROGRESS.size + JOB_BYTES
FLUSH_SECONDS = 0.02
_MAX_TARGET = 64
_SEQ = (list, tuple)  # what a chunk's arguments may travel in


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
        self.functions: dict = {}  # sha -> pickled function
        self.loaded: dict = {}  # sha (or (job, sha), see function) -> function
        self.init_names: dict = {}  # job -> globals its initializer set
        self.seq, self.idx = -1, -1
        self.block = None  # the items' block running now (see miniray.worker.itemblocks), or None
        self.pending: dict = {}  # job -> ([header], [batch]) not yet completed
        self.initialized: dict = {}  # job -> None, or the initializer's failure
        self.last_flush = time.monotonic()
        self.hello = hello
        self.pid = os.getpid()  # (a system call each time: once per outcome adds up)
        self.sender = Sender()  # results to clients on this machine (see miniray.values.inbox)
        self.placers: dict = {}  # a job spec's shm address -> its ResultPlacer (see miniray.values.shm)
        self.shm_read = False  # a chunk read arguments from shared memory: sweep after it
        self.queue: collections.deque[_Work] = collections.deque()
        self.held: dict[int, _Work] = {}  # seq -> work until its final outcome is in Redis
        self.next_seq = 1 << 40  # seqs of our own claims; the worker's are small
        # how many chunks to hold, per job: one until we know how long that job's take (a
        # slow job after a fast one must not be hoarded here by the fast one's figure: the
        # other workers would idle, and its queued tasks could no longer be cancelled)
        self.target = 1  # the largest of the jobs' (what a claim may take at most)
        self.timing: collections.OrderedDict = collections.OrderedDict()  # job -> (avg, n)
        self.known = ""  # ",job=n,...": the claim script takes n chunks of a job, else one
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
        self.log_lines: list = []  # (job, task, stream, text) not shipped yet
        self.log_lock = threading.Lock()
        self.log_send = threading.Lock()  # held while lines travel: outcomes wait for them
        self.log_ready = threading.Event()
        self.log_thread = None
        self.settings = settings()
        self.r = connect(hello["url"])
        self.deferred_errors: list = []  # error replies to report_and_wait's outcomes
        self.r.on_deferred_error = self.deferred_errors.append
        self.unconfirmed = None  # (report, n commands): report_and_wait's last, not read yet
        self.r_wait = connect(hello["url"])  # blocks for wake-ups (see report_and_wait)
        self.broker = Broker(self.r, hello["namespace"], load=False)
        self.waiter = Keys.waiter(hello["worker_id"], hello["slot"])
        self.wake_key = self.broker.keys.wake(self.waiter)
        self.hand_key = self.broker.keys.hand(self.waiter)  # chunks handed to this slot
        self.hand_key_b = self.hand_key.encode()
        self.registered = False  # in the idle zset, as far as we know
        self.woken = False  # its worker ended the last idle wait (see attend)
        self.expect_more = False  # the last claim took all it asked for (see report_and_wait)
        self.fn_key = self.broker.keys.fn
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
        self.ship([(w.job, task, stream, t) for t in lines])

    def ship(self, entries) -> None:
        """Queue log lines ``(job, task, stream, text)`` for the shipping thread, or for the
        next outcomes if they go first."""
        with self.log_lock:
            self.log_lines += entries
            if self.log_thread is None:
                self.log_thread = threading.Thread(target=self.ship_logs, daemon=True,
                                                   name="miniray-logs")
                self.log_thread.start()
        self.log_ready.set()

    def ship_logs(self) -> None:
        """Stream log lines while tasks run (``flush`` sends the rest before the outcomes).
        A chunk's "started" event is the claim script's."""
        conn = None
        while True:
            self.log_ready.wait()
            time.sleep(0.02)  # a burst of lines goes in one round trip
            with self.log_send:
                with self.log_lock:
                    self.log_ready.clear()
                    lines, self.log_lines = self.log_lines, []
                if not lines:
                    continue
                try:
                    if conn is None:
                        conn = connect(self.hello["url"])
                    pipe = conn.pipeline()
                    self.xadd_logs(pipe, lines)
                    pipe.execute()
                except RedisError:
                    conn = None  # lost with the server; the worker deals with that

    def xadd_logs(self, pipe, lines) -> None:
        h, keys, s = self.hello, self.broker.keys, self.settings
        for job, task, stream, text in lines:
            pipe.command("XADD", keys.logs(job), "MAXLEN", "~", s.log_stream_maxlen, "*",
                         "task", task, "worker", h["name"], "host", h["host"],
                         "stream", stream, "text", text)

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
                self.functions[sha] = data
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

    # -- Redis ----------------------------------------------------------------------------
    def redis(self, pipe_fill) -> list:
        """Run the commands ``pipe_fill(pipe)`` queues, again until the server takes them.

        An idle wait (``report_and_wait``) listens to the worker meanwhile: a stop, a pause
        or chunks sent end it (a cancel is for chunks this idle process does not hold)."""
        self.confirm_report()
        while True:
            pipe = self.r.pipeline()
            pipe_fill(pipe)
            try:
                return pipe.execute()
            except NoScriptError:  # the server restarted and lost our scripts
                self.broker.load_scripts()
            except ConnectionLost:  # the worker decides when the server is gone for good
                time.sleep(0.2)
                self.drain_worker()
                if self.stopped:
                    return []

    def report_and_wait(self, report, want: int) -> tuple:
        """``report(pipe)``'s commands (which register the slot as idle unless work is
        queued), then a wait (``miniray.worker.idlewait``: up to MINIRAY_IDLE_WAIT_SECONDS, or until
        the worker needs this process) for a chunk handed to the slot or a wake-up, and a
        claim. Returns ``(a chunk handed over, the claim's reply, whether the slot is registered
        as idle)``, each reply as the claim script gives it (or None).

        A handed chunk comes whole, as its claim's reply (see ``Broker.publish_one``): a lone
        submit's round trip has no claim script in it. After a claim that took all it asked
        for (more is likely queued: a stream of work) the claim goes in the same round trip
        as the wait, so a slot that finishes while work is queued holds the next chunk before
        its outcome reaches the client; otherwise a wake-up, or none within the wait, is
        followed by a claim, which registers the slot again if it finds nothing.

        The wait goes on a connection of its own: the outcomes' replies then arrive where
        nobody waits for them, so they do not wake this process a second time while its
        client and the server are busy with the result. They are read with the next report's
        (``confirm_report``), off the path of the result and of the next task."""
        try:
            pipe = self.r.pipeline()
            report(pipe)
            n = len(pipe)
            pipe.send_deferred()
            self.confirm_report()  # the last one's replies (they came long ago)
            self.unconfirmed = (report, n)
            streaming, self.woken = self.expect_more, False
            # (the claim, not registering: it may come with a hand-over)
            got = idlewait.wait_for_work(
                self.r_wait, self.r, self.hand_key, self.wake_key,
                self.settings.idle_wait_seconds, self.conn.fileno(), self.attend,
                (lambda pipe: self.claim(pipe, want)) if streaming else None)
            if got is None:  # told to stop
                return None, None, False
            handed = got[0][1] if got[0] and got[0][0] == self.hand_key_b else None
            if streaming:
                return handed, got[1], False
            if handed is not None:
                return handed, None, False
            pipe = self.r_wait.pipeline()
            if self.woken:  # its worker ended the wait (see attend): idle no more
                pipe.command("ZREM", self.broker.keys.idle, self.waiter)
                if not self.claiming:
                    pipe.execute()
                    return None, None, False
                self.claim(pipe, want)  # (a wake-up for work may have come with it)
                claimed = pipe.execute()[1]
                return None, claimed, False
            self.claim(pipe, want, register=True)
            claimed = pipe.execute()[0]
            return None, claimed, not claimed
        except (ConnectionLost, NoScriptError):  # as ``redis`` does: all of it again
            self.unconfirmed = None
            self.redis(report)  # outcomes sent twice count once (see the complete script)
            got = self.redis(lambda pipe: self.claim(pipe, want, register=True))
            return None, got[0] if got else None, bool(got) and not got[0]

    def attend(self) -> int:
        """The worker spoke during an idle wait (see ``miniray.worker.idlewait``): read it; the wait
        ends when the process must stop, stop claiming or run what it was sent."""
        self.drain_worker()
        if self.stopped:
            return idlewait.STOP
        if not self.claiming or self.queue:
            self.woken = True
            return idlewait.WAKE
        return idlewait.KEEP

    def confirm_report(self) -> None:
        """Read the replies to what ``report_and_wait`` sent; send it again if the server had
        lost our scripts (it restarted), raise another error reply as ``redis`` would."""
        if self.unconfirmed is None:
            return
        (report, n), self.unconfirmed = self.unconfirmed, None
        lost = False
        try:
            self.r.read_deferred(n)
        except ConnectionLost:
            lost = True
        errors, self.deferred_errors[:] = list(self.deferred_errors), []
        for e in errors:
            if not isinstance(e, NoScriptError):
                raise e
        if lost or errors:
            self.redis(report)  # (it loads the scripts again, and waits for the server)

    def claim(self, pipe, n: int, register: bool = False) -> None:
        h = self.hello
        triton = bool(self.prog_i[3] & 1)  # the worker's Triton server is healthy
        self.broker.claim(h["worker_id"], n, h["name"], h["host"], 0, h["ncpus"], pipe=pipe,
                          triton=triton, slot=h["slot"],
                          maxlen=self.settings.event_stream_maxlen, register=register,
                          known=self.known)

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
        self.fetch_functions(works)
        self.queue.extend(works)

    def fit(self, blob: bytes, batches: list, chunks: list) -> tuple:
        """A big result the server cannot hold (over its maxmemory) fails each of its items
        with an error that says so: a refused complete would otherwise kill this process,
        and the chunk would run again, and again."""
        try:
            check_room(self.r, len(blob), "results of these tasks")
            return blob, chunks
        except PayloadTooLargeError as e:
            err = (e, "", self.pid)
        for indices, values, errors, _ in batches:
            for k, i in enumerate(range(len(values)) if indices is None else indices):
                values[k] = None
                errors.setdefault(i, err)
        return (encode_batches(batches, _unpicklable),
                [(entry, 0, n_ok + n_err, final) for entry, n_ok, n_err, final in chunks])

    def placer(self, spec: dict, job: str = ""):
        """The sink that puts a job's big result buffers in shared memory, or else (a client
        that reads them so, ``big`` in its spec) on the server beside the result message
        (``miniray.values.bigvalues``), or None."""
        address = spec.get("shm")
        if address:
            p = self.placers.get(address)
            if p is None:
                if len(self.placers) > 100:  # (clients come and go: a bound, not a ledger)
                    self.placers.clear()
                p = self.placers[address] = shm.ResultPlacer(address,
                                                             spec.get("shm_min") or 1 << 20)
            if p.target is not None:
                return p.sink
        if spec.get("big") and job:
            return bigvalues.ResultStore(self.r, self.broker.keys, job, big_part_size,
                                         round(self.settings.client_grace_seconds) + 60).sink
        return None

    def part_size(self, size: int) -> int:
        """The most bytes one element of a result message may carry: what any server takes
        for a small message; for a big one, what this server takes (asked once)."""
        return SMALL_PART if size < BIG else big_part_size(self.r)

    def fits(self, spec: dict) -> bool:
        mem, ncpus, ngpus = self.hello["sig"]
        return (spec.get("memory_bytes") == mem and (spec.get("cpus") or 0) == ncpus
                and (spec.get("gpus") or 0) == ngpus)

    def fetch_functions(self, works) -> None:
        need = set()
        for w in works:
            for sha in (w.sha, w.spec.get("init")):
                if sha and sha not in self.functions:
                    need.add(sha)
        if not need:
            return
        need = sorted(need)
        got = self.redis(lambda pipe: pipe.command("MGET", *[self.fn_key(s) for s in need]))
        for sha, data in zip(need, got[0] if got else [None] * len(need)):
            if data is not None:
                self.functions[sha] = data
        for w in works:
            if w.missing is None and any(sha and sha not in self.functions
                                         for sha in (w.sha, w.spec.get("init"))):
                from miniray.errors import MinirayError

                w.missing = MinirayError(
                    f"the function of job {w.job} is no longer in Redis (it expired after "
                    "MINIRAY_FUNCTION_TTL_SECONDS or the server restarted); submit again")

    def flush(self, claim: bool = True, wait: bool = False) -> None:
        """Complete what finished (one script call per job) and, if wanted, claim more.

        With ``wait`` (nothing is queued here) it then waits (``report_and_wait``): a slot
        about to wait registers as idle with its outcomes, atomically with seeing no work
        queued, or wakes itself when there is some (see ``Broker.idle``); a claim that finds
        nothing registers it too. Registered already and with nothing to report, it goes
        straight to the wait."""
        in_task, self.in_task = self.in_task, False
        pending, self.pending = self.pending, {}
        h, s = self.hello, self.settings
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
            blob = encode_batches(batches, _unpicklable, self.placer(w.spec, job))
            if len(blob) >= BIG:
                blob, chunks = self.fit(blob, batches, chunks)
            msg = encode_result(ResultHeader(h["worker_id"], h["host"], self.pid, header,
                                             h["slot"]),
                                blob, self.part_size(len(blob)))
            # straight to a client on this machine, then the report without it (see inbox)
            if len(msg) == 1 and self.sender.send(w.spec.get("inbox"), msg[0]):
                msg = []
            calls.append((job, chunks, msg))
        want = (self.target - len(self.queue)) if claim and self.claiming else 0
        self.log_send.acquire()  # lines a task printed land before its outcome
        with self.log_lock:
            lines, self.log_lines = self.log_lines, []

        def report(pipe):
            self.xadd_logs(pipe, lines)
            idle = self.waiter if wait and not self.registered else ""
            for i, (job, chunks, msg) in enumerate(calls, 1):  # the last one goes idle too
                self.broker.complete(pipe, h["worker_id"], job, chunks, s.result_ttl_seconds,
                                     s.event_stream_maxlen, msg, idle if i == len(calls) else "")
            if idle and not calls:
                self.broker.idle(pipe, self.waiter)

        def fill(pipe):
            report(pipe)
            if want > 0:
                self.claim(pipe, want)
        handed = claimed = None
        try:
            if wait:
                want = max(1, want)
                handed, claimed, self.registered = self.report_and_wait(report, want)
            else:
                res = self.redis(fill) if calls or want > 0 or lines else []
                claimed = res[-1] if want > 0 and res else None
        finally:
            self.log_send.release()
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
            self.run_chunk(w.seq, w.job, w.sha, w.skip, w.spec.get("env"), w.frames,
                           w.spec.get("init"), w.spec)
            self.leftovers.after_chunk(keep)
        w.frames = None
        # time since it was taken, waiting here included: a queue that makes chunks wait
        # long is cut back, so other workers get a share of a short job
        self.learn(w.job, time.monotonic() - w.taken, w.count)

    def learn(self, job: str, seconds: float, count: int) -> None:
        """Size the local queue so that about 50 ms of ``job``'s work waits here."""
        per_item = seconds / max(1, count)
        timing = self.timing
        old = timing.get(job)
        avg = per_item if old is None else 0.7 * old[0] + 0.3 * per_item
        chunk_time = avg * max(1, count)
        target = int(min(_MAX_TARGET, max(1, 0.05 / max(chunk_time, 1e-6))))
        timing[job] = (avg, target)
        if old is None or old[1] != target:  # (the claim's table changes rarely)
            if old is None and len(timing) > 16:
                timing.popitem(last=False)
            self.known = "," + "".join(f"{j}={t}," for j, (_, t) in timing.items())
            self.target = max(t for _, t in timing.values())

    def function(self, sha: str, group=None):
        """The task function; for a job whose initializer set globals, a copy of its own
        whose globals (shared with the helpers pickled with it) have them too."""
        names = self.init_names.get(group) if group is not None else None
        key = (group, sha) if names else sha
        fn = self.loaded.get(key)
        if fn is None:
            fn = self.loaded[key] = _load_function(group, sha, self.functions[sha])
            g = _by_value_globals(fn) if names else None
            if g is not None:
                g.update(names)
        return fn

    def arguments(self, job, seq, frames) -> tuple:
        """A chunk's ``(items, kwargs, star, timed)``; an error that says so when its payload
        is not one this version writes (all of the chunk fails: not this process). ``timed``:
        its items' timings are wanted (a submit's, a ``map_futures`` chunk's)."""
        frames, used = shm.open_frames(frames)  # (a missing file: its own clear error)
        self.shm_read = self.shm_read or used
        frames = bigvalues.open_frames(frames, self.r)  # (big ones beside it, on the server)
        try:
            kind, *payload = pickle.loads(frames[0], buffers=frames[1:])
        except ImportError:  # a module the worker lacks: the user's error, as it is
            raise
        except Exception as e:
            raise bad_payload(job, "a task's arguments", e) from e
        count = self.held[seq].count
        if kind == "s" and len(payload) == 2 and type(payload[0]) in _SEQ \
                and type(payload[1]) is dict and count == 1:
            return [payload[0]], payload[1], True, True
        # "m": tuples of arguments; "m1": one argument each (map over one iterable); "m1t",
        # "mt": the same, timed (map_futures)
        if kind in ("m", "m1", "m1t", "mt") and len(payload) == 1 \
                and type(payload[0]) in _SEQ and len(payload[0]) == count:
            return payload[0], None, kind in ("m", "mt"), kind in ("m1t", "mt")
        raise malformed(job, f"a chunk's arguments are {_short((kind, *payload))}, not the "
                        f"{count} item(s) its head announces")

    def initialize(self, group, init) -> None:
        """Run the job's initializer once in this process; remember how it went, and the
        globals it set: a function sent by value has globals of its own, and without them
        the job's tasks would not see what the initializer loaded (ProcessPoolExecutor's
        tasks do; so must ours)."""
        if group in self.initialized:
            return
        try:
            fn = _load_function(group, init, self.functions[init])  # own globals, fresh
            g = _function_globals(fn)
            before = dict(g) if g is not None else {}
            self.leftovers.settle()  # (what earlier chunks left is not the initializer's)
            fn()
            # what the initializer starts (a model server, a pool) serves the job's tasks in
            # this process: it is kept, as with ProcessPoolExecutor, until the process ends
            self.leftovers.look(True, time.monotonic())
            if g is not None:
                names = {k: v for k, v in g.items() if k not in before or before[k] is not v}
                if names:
                    self.init_names[group] = names
            self.initialized[group] = None
        except BaseException as e:
            from miniray.errors import InitializerError

            err = InitializerError(
                f"the executor's initializer raised {type(e).__name__}: {_short(e)}, so no "
                "task of this job can run in this process; fix the initializer and submit "
                "again (its traceback is chained below)")
            self.initialized[group] = _portable_exc(err, task_traceback(e))

    def run_chunk(self, seq, group, sha, skip, env, frames, init=None, spec=None) -> None:
        self.seq = seq
        self.in_task = True
        saved = _apply_env(env)
        monotonic = time.monotonic
        try:
            try:
                if init:
                    self.initialize(group, init)
                    failed = self.initialized[group]
                    if failed is not None:
                        self.add(group, seq, True, None, [], {-1: failed}, 0, -1)
                        return
                fn = self.function(sha, group)
                items, kwargs, star, timed = self.arguments(group, seq, frames)
            except BaseException as e:  # the whole chunk fails the same way
                err = _portable_exc(e, task_traceback(e))
                self.add(group, seq, True, None, [], {-1: err}, 0, -1)
                return
            if itemblocks.usable(spec or {}, timed, skip, kwargs):  # many small items, fast
                first, values, errors = itemblocks.run(
                    self, fn, items, star, group, seq, FLUSH_SECONDS,
                    lambda e, args: _portable_exc(e, task_traceback(e, args, not star)))
                end_lines((sys.stdout, sys.stderr))
                self.add(group, seq, True, range(first, len(items)), values, errors,
                         len(values) - len(errors), len(errors))
                return
            values, errors, done = [], {}, []
            append, prog_i, prog_t = values.append, self.prog_i, self.prog_t
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
                if now - self.last_flush >= FLUSH_SECONDS and values:
                    idx = done if skip else range(first, i)
                    mark(now)
                    self.add(group, seq, False, idx, values, errors,
                             len(values) - len(errors), len(errors), timed and starts)
                    prog_i[1] = -1  # between items: a death now is not this item's fault
                    self.flush()
                    values, errors, done, first = [], {}, [], i
                    append = values.append
                    starts = [offset]
                    mark = starts.append
                    now = monotonic()  # (the flush was neither item's time)
                self.idx = prog_i[1] = i
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
                    errors[i] = _portable_exc(e, task_traceback(e, args, not star))
                if skip:
                    done.append(i)
            mark(monotonic())
            end_lines((sys.stdout, sys.stderr))
            idx = done if skip else range(first, len(items))
            self.add(group, seq, True, idx, values, errors, len(values) - len(errors),
                     len(errors), timed and starts)
        finally:
            if self.shm_read:  # its client may be gone: its files with it (see miniray.values.shm)
                self.shm_read = False
                shm.sweep()
            prog_i = self.prog_i
            prog_i[0] = prog_i[1] = -1
            self.prog_t[2] = 0.0
            self.in_task = False
            _restore_env(saved)
            self.idx = -1

    def add(self, group, seq, final, indices, values, errors, n_ok, n_err,
            times=None) -> None:
        """Queue outcomes for the next flush; ``times``: the wall-clock offset, each value's
        start and the last one's end (see ``protocol.item_times``)."""
        if errors:
            for i, (exc, tb, pid) in errors.items():
                if type(exc) is _CancelInterrupt:  # the item was cancelled, it did not fail
                    from miniray.errors import JobCancelledError

                    errors[i] = (JobCancelledError(
                        f"job {group} was cancelled while this task was running"), "", pid)
        heads, batches = self.pending.setdefault(group, ([], []))
        heads.append((seq, final, indices, n_ok, n_err))
        batches.append((indices, values, errors, array("d", times).tobytes() if times else None))


class _CancelInterrupt(KeyboardInterrupt):
    """Raised in a task by its worker's SIGINT (its job was cancelled): a KeyboardInterrupt,
    so that the task's ``except Exception`` lets it through; reported as JobCancelledError."""


def _unpicklable(value, e: Exception):
    """The error that takes the place of a result that cannot be pickled to travel back."""
    from miniray.errors import SerializationError

    return SerializationError(
        f"the task's result {_short(value)} cannot be pickled to travel back: "
        f"{type(e).__name__}: {e}. Return plain data (or make the type picklable).")


def _load_function(job, sha, data):
    try:
        return pickle.loads(data)
    except ImportError:  # a module the worker lacks: the user's error, as it is
        raise
    except Exception as e:
        raise bad_payload(job, f"its function (fn:{sha[:12]}...)", e) from e


def _function_globals(fn):
    """The globals dict of a Python function (or of the one a partial wraps), else None."""
    if isinstance(fn, functools.partial):
        fn = fn.func
    return fn.__globals__ if isinstance(fn, types.FunctionType) else None


def _by_value_globals(fn):
    """The globals dict of a function that travelled by value (a notebook's, or a module's
    next to the caller's), else None: a module's real namespace needs no help."""
    if isinstance(fn, functools.partial):
        fn = fn.func
    g = _function_globals(fn)
    module = sys.modules.get(fn.__module__) if g is not None else None
    return None if g is None or (module is not None and vars(module) is g) else g


def _portable_exc(e: BaseException, tb: str):
    """(exception, traceback), with an exception that survives a pickle round trip; ``tb``
    is a ``TaskTraceback`` (text that also carries the user's frames)."""
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
        from .isolation import MemoryCgroup

        MemoryCgroup.join(cgroup)
    if rlimit:
        from .isolation import apply_rlimit_as

        apply_rlimit_as(int(rlimit))
    if cpus:
        from .isolation import pin_cpus

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
            raise _CancelInterrupt

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


if __name__ == "__main__":
    main()
