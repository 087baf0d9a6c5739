"""What a slot reports itself: the failures it finds, as result messages for the next pipeline.

A slot thread fails chunks on its own (a cancelled job, a malformed one, the item its task
process died in: see ``slot`` and ``slotdeath``). Each failure becomes one result message,
queued here and sent with the complete script in one pipeline every 20 ms at most: a round
trip per task would compete with the tasks' own for the server and the CPU.
"""

from __future__ import annotations

import os
import time

from miniray.protocol import ResultHeader, encode_result

__all__ = ["SlotReports"]


class SlotReports:
    """The result messages one slot queued, and when it last sent them."""

    def __init__(self, worker, r, broker, index: int):
        self.w, self.r, self.broker, self.index = worker, r, broker, index
        self.out: list = []  # commands for the next pipeline: (fn, args)
        self.last_out = 0.0

    def report(self, job: str, done: list, blob: bytes) -> None:
        """Queue one result message for ``job`` (failures the slot itself found): ``done``
        lines up with the blob's batches."""
        w = self.w
        header = ResultHeader(w.worker_id, w.host, os.getpid(),
                              [(c.chunk, final) for c, final, _, _ in done], self.index)
        chunks = [(c.entry, n_ok, n_err, final) for c, final, n_ok, n_err in done]
        self.out.append((self._complete, (job, chunks, encode_result(header, blob))))

    def ship(self, died: bool) -> None:
        """Send what is queued, 20 ms after the last time at most (at once after a death)."""
        now = time.monotonic()
        if self.out and (now - self.last_out >= 0.02 or died or len(self.out) > 256):
            self.last_out = now
            pipe = self.r.pipeline()
            self.drain(pipe)
            pipe.execute()

    def drain(self, pipe) -> None:
        """Queue what waits on ``pipe``."""
        out, self.out = self.out, []
        for fn, args in out:
            fn(pipe, *args)

    def _complete(self, pipe, job, chunks, msg) -> None:
        s = self.w.settings
        self.broker.complete(pipe, self.w.worker_id, job, chunks, s.result_ttl_seconds,
                             s.event_stream_maxlen, msg)
