"""A task process's log lines on their way to the job's log stream (``logs:{job}``).

::

    Capture / LogHandler (output.py) --Runner.log--> ship() --> lines --> the shipping thread:
                                                                   |      XADD every 20 ms, on
                                                                   |      a connection of its own
                                                                   +--> take(): the rest go in
                                                                          the outcomes' pipeline

A thread streams lines while tasks run; when outcomes go to Redis, the lines not shipped yet
go first, in the same pipeline, so a task's lines land before its outcome (``take`` holds
the shipping thread off until ``release``).
"""

from __future__ import annotations

import threading
import time

from miniray.broker import connect
from miniray.resp import RedisError

__all__ = ["LogShipper"]


class LogShipper:
    """Lines ``(job, task, stream, text)`` queued for the job's log stream, and their thread."""

    def __init__(self, hello: dict, keys, settings):
        self.hello, self.keys, self.settings = hello, keys, settings
        self.log_lines: list = []  # (job, task, stream, text) not shipped yet
        self.log_lock = threading.Lock()
        self.log_send = threading.Lock()  # held while lines travel: outcomes wait for them
        self.log_ready = threading.Event()
        self.log_thread = None

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
        """Stream log lines while tasks run (``take`` gives the rest to the outcomes).
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

    def take(self) -> list:
        """The lines not shipped yet, for the outcomes' pipeline; the shipping thread waits
        until ``release`` (lines a task printed land before its outcome)."""
        self.log_send.acquire()
        with self.log_lock:
            lines, self.log_lines = self.log_lines, []
        return lines

    def release(self) -> None:
        self.log_send.release()

    def xadd_logs(self, pipe, lines) -> None:
        h, keys, s = self.hello, self.keys, self.settings
        for job, task, stream, text in lines:
            pipe.command("XADD", keys.logs(job), "MAXLEN", "~", s.log_stream_maxlen, "*",
                         "task", task, "worker", h["name"], "host", h["host"],
                         "stream", stream, "text", text)
