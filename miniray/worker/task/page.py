"""The page a task process shares with its worker: what runs now, and the worker's flags.

The task process (``process.py``) writes, before each item, the chunk seq and item index running
now (-1: none) and its monotonic start time; before each chunk of its own claim, the chunk id
and job (UTF-8, NUL-padded, after the struct): a chunk the process claimed itself may run
before the worker has heard of it. The worker (``taskslot.TaskProcess``) reads it to enforce
timeouts and to know which item a dead process was running, and sets the flags (bit 0: its
Triton server is healthy)::

    PROGRESS: seq (q) | item index (q) | start (d) | flags (q) | chunk id (q)  then  job
"""

import struct

__all__ = ["PROGRESS", "JOB_BYTES", "PAGE_SIZE"]

PROGRESS = struct.Struct("qqdqq")
JOB_BYTES = 96
PAGE_SIZE = PROGRESS.size + JOB_BYTES
