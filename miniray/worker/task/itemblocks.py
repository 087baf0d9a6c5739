"""Running a map chunk's items in blocks: the task process's fast path for many small items.

The exact loop (``run.run_chunk``) does its bookkeeping before every item: the
item's index and start on the shared page (for the worker's timeout and its blame when the
process dies), a look at the clock (to stream partial results). That costs several times what
a small function like ``x + 1`` does. Here a block of items runs in one C-level
``list.extend(map(fn, block))`` and the bookkeeping happens at the block's edges; the block
grows while its items are fast (about ``BLOCK_SECONDS`` of work each) and shrinks to one item
as soon as they are not, so a slow item delays the streaming of what came before it by no
more than it would anyway.

What stays exact:

- an item's exception is its own: ``list.extend`` keeps what the block made before the item
  that raised, so that item's index is known, and the block goes on after it (a
  ``StopIteration`` ends ``map`` quietly: a block that comes up short names the item, whose
  error is rebuilt without its traceback);
- a log line is attributed to its item (``item()``: the block's values grow one per item);
- a death of the process: while a block runs the page says ``BLOCK_MARK - start`` rather
  than an item index, so the worker blames no item; it runs the chunk again with ``exact``
  in its spec (see ``worker``), where the exact loop finds the culprit if it dies again.

Used only for map chunks (``map``'s, not ``map_futures``' or a submit's: their items' timings
travel) whose job has no ``timeout_seconds`` (a timeout counts from each item's own start)
and that did not kill a process before.
"""

from __future__ import annotations

import itertools
import time

__all__ = ["BLOCK_MARK", "EXACT", "usable", "run"]

BLOCK_SECONDS = 0.001  # a block's work, about: between two looks at the clock
FIRST_BLOCK = 4  # items in the first block of a chunk (it learns from there)
MAX_BLOCK = 4096
# on the page's item index: a block starting at item i runs (BLOCK_MARK - i; -1 means
# "between items", so every value <= BLOCK_MARK is a block)
BLOCK_MARK = -2
EXACT = "exact"  # in a chunk's spec: run with the exact loop (it killed a process in a block)


def usable(spec: dict, timed: bool, skip, kwargs) -> bool:
    """Whether a chunk may run in blocks (see the module's docstring)."""
    return not (timed or skip or kwargs or spec.get("timeout") or spec.get(EXACT))


class _Block:
    """The values list being filled and the index of its first item: ``item()`` is the item
    running now."""

    __slots__ = ("values", "first")

    def __init__(self, values: list, first: int):
        self.values, self.first = values, first

    def item(self) -> int:
        return self.first + len(self.values)


def run(runner, fn, items, star: bool, group: str, seq: int, flush_seconds: float,
        fail) -> tuple:
    """Run ``fn`` over ``items`` (argument tuples when ``star``) in blocks; flush partial
    outcomes through ``runner`` as the exact loop does. Returns ``(first, values, errors)``:
    what is left to report, ``values`` being the outcomes of items ``first`` on.
    ``fail(exc, item)`` makes an item's error entry."""
    prog_i, prog_t = runner.prog_i, runner.prog_t
    monotonic = time.monotonic
    apply = itertools.starmap if star else map
    n = len(items)
    values: list = []
    errors: dict = {}
    first = i = 0
    size = FIRST_BLOCK
    prog_i[0] = seq
    block = runner.block = _Block(values, first)
    try:
        while i < n:
            now = monotonic()
            if now - runner.last_flush >= flush_seconds and values:
                prog_i[1] = -1  # between items: a death now is not this item's fault
                runner.add(group, seq, False, range(first, i), values, errors,
                           len(values) - len(errors), len(errors))
                runner.flush()
                values, errors, first = [], {}, i
                block.values, block.first = values, first
                now = monotonic()  # (the flush was no item's time)
            prog_i[1] = BLOCK_MARK - i
            prog_t[2] = now
            at, end = i, min(n, i + size)
            try:
                values.extend(apply(fn, items[i:end]))
                i = first + len(values)
                if i < end:  # the item raised StopIteration, which ends a map: its own
                    values.append(None)  # error, rebuilt (that one's traceback is lost)
                    errors[i] = fail(StopIteration(
                        "the task raised StopIteration (its traceback is lost: it ended the "
                        "block of items it ran in)"), items[i])
                    i += 1
            except BaseException as e:  # the item that raised is the one after those made
                j = first + len(values)
                values.append(None)
                errors[j] = fail(e, items[j])
                i = j + 1
            # about BLOCK_SECONDS per block: grow at most 4x a step, shrink at once
            per = (monotonic() - now) / (i - at)
            size = max(1, min(MAX_BLOCK, size * 4,
                              int(BLOCK_SECONDS / per) if per > 0 else MAX_BLOCK))
    finally:
        runner.block = None
        prog_i[1] = -1
    return first, values, errors
