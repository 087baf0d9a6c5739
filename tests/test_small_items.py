"""Many small items: a map's chunk runs in blocks in the task process
(``miniray.worker.task.itemblocks``) and its results come out of ``map`` at C speed
(``miniray.client.feeding.MapResults``). What stays exact: each item's error, its log lines' task
id, the blame when the process dies, and what ``close()`` ends. Real workers and real crashes
(``os._exit``); speed itself is measured in ``bench/run.py`` (W2), not here."""

import functools

import pytest

import tasks
from support import wait_for
from miniray.errors import TaskCrashedError

pytestmark = pytest.mark.timeout(60)


def test_a_crash_inside_a_block_fails_its_own_item_and_the_rest_run(one_worker, tmp_path):
    """The process dies while a block of items runs: the page says which block, not which
    item, so no item is blamed and the chunk runs again item by item; there the culprit dies
    again and is the one that fails (it ran twice: once in the block, once alone)."""
    log = tmp_path / "runs"
    with one_worker.executor() as ex:
        fn = functools.partial(tasks.exit_on, bad=3, log=str(log))
        results = ex.map(fn, range(8), chunksize=8, timeout=40)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(TaskCrashedError):
            next(results)
        wait_for(lambda: ex.progress()["done"] + ex.progress()["failed"] == 8,
                 what="the chunk's other items")
        assert ex.progress()["failed"] == 1 and ex.progress()["done"] == 7
        runs = log.read_text().split()
        assert runs.count("3") == 2, runs
        assert all(runs.count(str(i)) >= 1 for i in range(8)), runs
        assert list(ex.map(tasks.square, range(5), chunksize=5)) == [0, 1, 4, 9, 16]


def test_an_error_in_a_block_is_its_own_items_and_the_block_goes_on(one_worker):
    with one_worker.executor() as ex:
        results = ex.map(tasks.raise_value_error, range(300), chunksize=300)
        assert [next(results) for _ in range(3)] == [0, 1, 2]
        with pytest.raises(ValueError, match="bad item 3"):
            next(results)
        assert list(results) == []  # (a map ends at its first error)
        wait_for(lambda: ex.progress()["done"] == 299, what="the items after the error")
        assert ex.progress()["failed"] == 1


def test_a_line_printed_in_a_block_names_its_item(one_worker):
    with one_worker.executor() as ex:
        assert list(ex.map(tasks.print_item, range(200), chunksize=200)) == list(range(200))
        first = ex._next_task - 200  # (this map's first task id)
        wait_for(lambda: len([ln for ln in ex.logs() if ln.text.startswith("item ")]) == 200,
                 what="the 200 lines")
        lines = [ln for ln in ex.logs() if ln.text.startswith("item ")]
    assert sorted(ln.task - first for ln in lines) == list(range(200))
    assert all(ln.task - first == int(ln.text.split()[1]) for ln in lines)


def test_closing_a_map_ends_it_inside_a_chunk_of_numbers(one_worker):
    """A chunk of numbers is iterated as its own list: ``close()`` still ends the iteration
    at once, for an iterator taken before it too, as a generator's close does."""
    with one_worker.executor() as ex:
        results = ex.map(tasks.square, range(50), chunksize=50)
        it = iter(results)
        assert [next(it), next(results)] == [0, 1]
        results.close()
        assert list(it) == [] and list(results) == []
        wait_for(lambda: ex.progress()["running"] == 0, what="the chunk to end")


def test_closing_a_map_ends_it_inside_a_chunk_of_objects(one_worker):
    with one_worker.executor() as ex:
        results = ex.map(tasks.identity, [[i] for i in range(20)], chunksize=20)
        assert [next(results) for _ in range(2)] == [[0], [1]]
        results.close()
        assert list(results) == []


def test_stop_iteration_in_a_block_fails_its_item_and_shifts_nothing(one_worker):
    """StopIteration ends a C-level ``map`` quietly: the block must still see which item
    raised it, fail that one, and run the rest, each value in its place."""
    with one_worker.executor() as ex:
        results = ex.map(tasks.stop_on, range(60), chunksize=60)
        assert [next(results) for _ in range(5)] == [0, 1, 2, 3, 4]
        with pytest.raises(RuntimeError) as info:  # (a generator turns it into this, as
            next(results)                          # CPython's map does)
        assert isinstance(info.value.__cause__, StopIteration)
        wait_for(lambda: ex.progress()["done"] == 59, what="the items after it")
        assert ex.progress()["failed"] == 1
        assert list(ex.map(tasks.stop_on, range(6, 60), chunksize=60)) == list(range(6, 60))


def test_map_yields_values_that_cannot_be_compared(one_worker):
    """numpy arrays (whose ``==`` is elementwise, and whose truth value raises) come out of
    ``map`` whole and in order, through a chunk's stack as any other object."""
    np = pytest.importorskip("numpy")
    with one_worker.executor() as ex:
        got = list(ex.map(np.full, [3] * 5, range(5), chunksize=5))
    assert [a.tolist() for a in got] == [[i] * 3 for i in range(5)]
