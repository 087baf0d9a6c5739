"""What a task process's death means: the item to blame, its error, and what goes again.

When a slot's task process dies (a crash, a kill past its timeout or a cancel's grace, the
memory limit), its slot thread calls ``handle_death``::

    the page (chunk seq, item index)  --> the item running: fails with the death's error
                                          (TaskTimeoutError, MemoryLimitError, JobCancelledError,
                                          TaskCrashedError); in a block of items: nobody is
                                          blamed, the chunk runs again item by item
    inflight + unannounced (``wip``)  --> everything else it held goes again, in order, to a
                                          fresh process (payloads read back from Redis), or
                                          fails when its job was cancelled or is gone

The functions take the ``Slot`` (``slot.py``) whose process died: they read and change what it
holds (``inflight``, ``pending``, ``seq``) and report failures through ``slot.reports``.
"""

from __future__ import annotations

from miniray.errors import MemoryLimitError, MinirayError, TaskCrashedError, TaskTimeoutError
from miniray.keys import Keys
from miniray.protocol import encode_batches

from .slotchunk import Chunk, cancelled_error, decode_head, spec_of
from .task import itemblocks
from .taskslot import TaskProcess

__all__ = ["handle_death"]


def handle_death(slot, proc: TaskProcess) -> None:
    """The task process is gone: fail the item it was running, resend the rest."""
    seq, idx, started = proc.progress()
    _, page_job, page_chunk = proc.running_chunk()
    reason = proc.killed_for
    oom = proc.oom_killed()
    how = proc.death()
    proc.close(graceful=False)
    slot.proc = None
    if reason == "shutdown":
        return  # the worker is leaving: shutdown() hands its chunks back, nothing failed
    slot.unregister()
    extra = unannounced(slot) if slot.direct else []
    c = slot.inflight.get(seq)
    in_block = idx <= itemblocks.BLOCK_MARK  # in a block of items: nobody to blame
    if c is None and seq >= 0 and (idx >= 0 or in_block):  # claimed, not told us of
        c = next((x for x in extra if (x.job, x.chunk) == (page_job, page_chunk)), None)
        if c is not None and not load_frames(slot, c):
            c = None  # the job is gone (cancelled or closed): nothing to report to
    if c is not None and in_block:  # no item blamed: it runs again item by item, where
        c.spec = {**c.spec, itemblocks.EXACT: True}  # a second death names its item
    elif c is not None and idx >= 0 and idx not in c.delivered:
        exc = death_error(slot, c, reason, oom, how)
        blob = encode_batches([([idx], [None], {idx: (exc, "", proc.pid)})])
        c.delivered.add(idx)
        done = len(c.delivered) == c.count
        if done:
            slot.inflight.pop(c.seq, None)
            if c in extra:
                extra.remove(c)
        slot.reports.report(c.job, [(c, done, 0, 1)], blob)
    # everything else it held goes again, in order, to a fresh process
    again = sorted(slot.inflight.values(), key=lambda x: x.seq) + extra
    slot.inflight.clear()
    for x in reversed(again):
        if x.job in slot.cancelled_jobs or (x.job, x.chunk) in slot.stopped:
            slot.fail_chunk(x, cancelled_error(x.job))
        elif x.frames is None and not load_frames(slot, x):
            slot.fail_chunk(x, MinirayError(
                f"job {x.job} no longer has this task's arguments in Redis (it was "
                "cancelled or closed while the task's process died)"))
        else:
            slot.pending.appendleft(x)


def unannounced(slot) -> list:
    """Chunks the dead process had claimed but not yet told us of (from ``wip``)."""
    known = {(c.job, c.chunk) for c in list(slot.inflight.values()) + list(slot.pending)}
    held = slot.r.execute("HGETALL", slot.w.keys.wip(slot.w.worker_id))
    out, tag = [], f"@{slot.index}"
    for i in range(0, len(held), 2):
        field, value = held[i].decode(), held[i + 1].decode()
        job, _, chunk = field.rpartition("/")
        if not value.endswith(tag) or (job, int(chunk)) in known:
            continue
        spec, bad = spec_of(job, slot.r.execute("HGET", slot.w.keys.job(job), "spec"))
        entry = value[: -len(tag)]
        slot.seq += 1
        out.append(Chunk(job, entry, int(chunk), slot.seq, None, 0,
                          Keys.parse_entry(entry)[2], None, spec, bad=bad))
    return out


def load_frames(slot, c: Chunk) -> bool:
    """Read a chunk's payload back from Redis for a resend; False when it is gone."""
    _, nframes, _ = Keys.parse_entry(c.entry)
    fields = [Keys.payload_field(c.chunk, i) for i in range(nframes)]
    frames = slot.r.execute("HMGET", slot.w.keys.tasks(c.job), *fields)
    if any(f is None for f in frames):
        return False
    if c.bad is not None or not decode_head(c, frames):
        return True  # (dispatch fails it)
    init = c.spec.get("init")
    return not slot.w.functions_missing({c.sha} | ({init} if init else set()), slot.r)


def death_error(slot, c: Chunk, reason, oom: bool, how: str) -> BaseException:
    where = f"on worker {slot.w.name} ({slot.w.host})"
    spec = c.spec
    if reason == "timeout":
        return TaskTimeoutError(
            f"task ran longer than its limit of {spec['timeout']:g} s "
            f"(Limits(timeout_seconds={spec['timeout']:g})) and was killed {where}")
    if reason == "cancel":
        return cancelled_error(c.job)
    if oom or (spec.get("memory_bytes") and how == "killed by SIGKILL"):
        gb = spec["memory_bytes"] / 1024**3
        return MemoryLimitError(
            f"task used more than its memory limit of {gb:g} GB "
            f"(Limits(memory_gb={gb:g})) and was killed {where}; raise the limit or "
            "process less data per task")
    return TaskCrashedError(
        f"the process running the task {how} {where}; the worker replaced it. "
        "A segfault in a C extension or os._exit() in the task does this")
