"""A task process's round trips with Redis: outcomes reported, work claimed, the idle wait.

::

    Runner.flush --report(pipe)--> redis():           the commands, again until the server
                                                        takes them (scripts reloaded after a
                                                        restart; the worker decides when the
                                                        server is gone for good)
                 --report, want--> report_and_wait():  outcomes sent, not read (confirm_report
                                                        reads them with the next report), then
                                                        idlewait.wait_for_work on a second
                                                        connection: hand:{slot} or wake:{slot},
                                                        then the claim (registering as idle
                                                        when it finds nothing)

``Claims`` owns the two connections, the replies not read yet and the idle wait's state. It
reads a few things of its ``Runner`` (``process.py``): ``drain_worker``/``stopped`` (the worker
may speak while the server is away or during a wait), ``claiming`` and ``queue`` (when a wait
ends), ``conn`` (the worker's socket, watched during a wait), ``prog_i`` (the worker's flags on
the page). It sizes the claims too (``learn``): about 50 ms of each job's work held here.
"""

from __future__ import annotations

import collections
import time

from miniray.broker import Broker, connect
from miniray.keys import Keys
from miniray.resp import ConnectionLost, NoScriptError

from . import idlewait

__all__ = ["Claims"]

_MAX_TARGET = 64


class Claims:
    """A task process's connections to Redis and its claims (see the module's docstring)."""

    def __init__(self, runner, hello: dict, settings):
        self.runner, self.hello, self.settings = runner, hello, settings
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
        self.woken = False  # its worker ended the last idle wait (see attend)
        # how many chunks to hold, per job: one until we know how long that job's take (a
        # slow job after a fast one must not be hoarded here by the fast one's figure: the
        # other workers would idle, and its queued tasks could no longer be cancelled)
        self.target = 1  # the largest of the jobs' (what a claim may take at most)
        self.timing: collections.OrderedDict = collections.OrderedDict()  # job -> (avg, n)
        self.known = ""  # ",job=n,...": the claim script takes n chunks of a job, else one

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
                self.runner.drain_worker()
                if self.runner.stopped:
                    return []

    def report_and_wait(self, report, want: int, streaming: bool) -> tuple:
        """``report(pipe)``'s commands (which register the slot as idle unless work is queued), then
        a wait (``miniray.worker.task.idlewait``: up to MINIRAY_IDLE_WAIT_SECONDS, or until the
        worker needs this process) for a chunk handed to the slot or a wake-up, and a claim. Returns
        ``(a chunk handed over, the claim's reply, whether the slot is registered as idle)``, each
        reply as the claim script gives it (or None).

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
            self.woken = False
            # (the claim, not registering: it may come with a hand-over)
            got = idlewait.wait_for_work(
                self.r_wait, self.r, self.hand_key, self.wake_key,
                self.settings.idle_wait_seconds, self.runner.conn.fileno(), self.attend,
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
                if not self.runner.claiming:
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
        """The worker spoke during an idle wait (see ``miniray.worker.task.idlewait``): read it; the
        wait ends when the process must stop, stop claiming or run what it was sent."""
        self.runner.drain_worker()
        if self.runner.stopped:
            return idlewait.STOP
        if not self.runner.claiming or self.runner.queue:
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
        triton = bool(self.runner.prog_i[3] & 1)  # the worker's Triton server is healthy
        self.broker.claim(h["worker_id"], n, h["name"], h["host"], 0, h["ncpus"], pipe=pipe,
                          triton=triton, slot=h["slot"],
                          maxlen=self.settings.event_stream_maxlen, register=register,
                          known=self.known)

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
