"""Where a task process puts a job's outcomes: the result message and its big buffers.

::

    outcomes of a job --encode_batches--> blob --> result message (protocol.encode_result)
        big buffers --> /dev/shm of the client (values.shm.ResultPlacer), or
                        big:{job}:{id} on the server (values.bigvalues.ResultStore)
        a blob the server has no room for --> each item fails with PayloadTooLargeError
        a one-part message --> straight to a client on this machine (values.inbox.Sender)

A result that cannot be pickled fails its item with a ``SerializationError`` (``unpicklable``)
rather than being dropped.
"""

from __future__ import annotations

import os

from miniray.errors import PayloadTooLargeError
from miniray.protocol import ResultHeader, encode_batches, encode_result
from miniray.values import bigvalues, shm
from miniray.values.inbox import Sender
from miniray.values.payloads import BIG, SMALL_PART, big_part_size, check_room

from .run import short

__all__ = ["ResultPacker", "unpicklable"]


class ResultPacker:
    """Turns a job's outcomes into its result message, its big buffers placed."""

    def __init__(self, r, keys, hello: dict, settings):
        self.r, self.keys, self.hello, self.settings = r, keys, hello, settings
        self.pid = os.getpid()  # (a system call each time: once per outcome adds up)
        self.sender = Sender()  # results to clients on this machine (see miniray.values.inbox)
        self.placers: dict = {}  # a job spec's shm address -> its shm.ResultPlacer

    def message(self, job: str, spec: dict, header: list, batches: list, chunks: list) -> tuple:
        """``(chunks, the result message's parts)``: no parts when the message went straight to
        a client on this machine (the complete script then only counts the outcomes);
        ``chunks`` as the complete script takes them, changed when the blob did not fit."""
        h = self.hello
        blob = encode_batches(batches, unpicklable, self.placer(spec, job))
        if len(blob) >= BIG:
            blob, chunks = self.fit(blob, batches, chunks)
        msg = encode_result(ResultHeader(h["worker_id"], h["host"], self.pid, header,
                                         h["slot"]),
                            blob, self.part_size(len(blob)))
        # straight to a client on this machine, then the report without it (see inbox)
        if len(msg) == 1 and self.sender.send(spec.get("inbox"), msg[0]):
            msg = []
        return chunks, msg

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
        return (encode_batches(batches, unpicklable),
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
            return bigvalues.ResultStore(self.r, self.keys, job, big_part_size,
                                         round(self.settings.client_grace_seconds) + 60).sink
        return None

    def part_size(self, size: int) -> int:
        """The most bytes one element of a result message may carry: what any server takes
        for a small message; for a big one, what this server takes (asked once)."""
        return SMALL_PART if size < BIG else big_part_size(self.r)


def unpicklable(value, e: Exception):
    """The error that takes the place of a result that cannot be pickled to travel back."""
    from miniray.errors import SerializationError

    return SerializationError(
        f"the task's result {short(value)} cannot be pickled to travel back: "
        f"{type(e).__name__}: {e}. Return plain data (or make the type picklable).")
