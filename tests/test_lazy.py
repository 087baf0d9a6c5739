"""Bounded memory for endless inputs: ``map(..., buffersize=)`` with Python 3.14's semantics,
``map_futures`` over several iterables and with a bound (a feeder thread), against a real
server and real workers. Memory is measured by counts (how far the input was read, how long
the server's queue is), never by RSS or time."""

import concurrent.futures as cf
import itertools

import pytest

import tasks
from miniray.resp import Connection
from support import wait_for

pytestmark = pytest.mark.timeout(60)


class Counted:
    """An input that records how far it was read (``read``: items taken from it)."""

    def __init__(self, n=None):
        self.n, self.read = n, 0

    def __iter__(self):
        i = 0
        while self.n is None or i < self.n:
            self.read = i + 1
            yield i
            i += 1


def _queued(cluster, ex) -> int:
    conn = Connection(cluster.url)
    try:
        return conn.execute("LLEN", ex.keys.queue(ex.job_id))
    finally:
        conn.close()


def test_buffersize_bounds_how_far_the_input_is_read(cluster):
    cluster.start_worker()
    items, bound, size = Counted(40), 3, 2
    with cluster.executor() as ex:
        results = ex.map(tasks.sleep_then, itertools.repeat(0.02), iter(items), chunksize=size,
                         buffersize=bound)
        assert items.read == bound * size  # the first chunks go at once, as in CPython
        got = []
        for k, value in enumerate(results):
            got.append(value)
            # the chunk being yielded, and at most `bound` chunks after it, were read
            assert items.read <= (k // size + 1 + bound) * size
            assert _queued(cluster, ex) <= bound
        assert got == list(range(40))


def test_endless_input_closed_early_stops_feeding_and_leaves_nothing_queued(cluster):
    cluster.start_worker()
    items = Counted()  # endless
    with cluster.executor() as ex:
        results = ex.map(tasks.identity, iter(items), chunksize=4, buffersize=5)
        got = [next(results) for _ in range(50)]
        assert got == list(range(50))
        assert items.read <= 50 + 6 * 4
        results.close()
        read = items.read
        wait_for(lambda: ex.progress()["queued"] == 0 and ex.progress()["running"] == 0,
                 what="the closed map's chunks to end")
        assert _queued(cluster, ex) == 0
        assert items.read == read  # nothing more was read after close
    assert items.read == read


@pytest.mark.parametrize("bad, error, says", [
    (0, ValueError, "must be None or > 0"), (-1, ValueError, "must be None or > 0"),
    (1.5, TypeError, "must be an integer or None"), ("8", TypeError, "must be an integer")])
def test_invalid_buffersize_is_refused_before_anything_runs(cluster, bad, error, says):
    items = Counted(10)
    with cluster.executor() as ex:
        with pytest.raises(error, match=f"buffersize {says}"):
            ex.map(tasks.identity, iter(items), buffersize=bad)
        with pytest.raises(error, match=f"buffersize {says}"):
            ex.map_futures(tasks.identity, iter(items), buffersize=bad)
        assert items.read == 0 and ex._n_items == 0
    # the same exception types as Python 3.14's Executor.map
    with cf.ThreadPoolExecutor(1) as tp:
        if hasattr(tp.map, "__code__") and "buffersize" in tp.map.__code__.co_varnames:
            with pytest.raises(error):
                tp.map(str, [1], buffersize=bad)


def test_bounded_map_gives_what_map_gives(cluster):
    cluster.start_worker()
    a, b = list(range(57)), list(range(100, 157))
    with cluster.executor() as ex:
        eager = list(ex.map(tasks.add, a, b, chunksize=5))
        for size, bound in [(1, 1), (5, 2), (7, 100)]:
            assert list(ex.map(tasks.add, a, b, chunksize=size, buffersize=bound)) == eager
        assert eager == [x + y for x, y in zip(a, b)]
        # the first error raises when its element is reached, with what came before it
        got = []
        with pytest.raises(ValueError):
            for v in ex.map(tasks.fail_every, range(1, 20), chunksize=3, buffersize=2):
                got.append(v)
        assert got == [1, 2, 3]


def test_map_futures_takes_several_iterables(cluster):
    cluster.start_worker()
    with cluster.executor() as ex:
        futures = ex.map_futures(tasks.add, [1, 2, 3], (10, 20, 30, 40), chunksize=2)
        assert isinstance(futures, list) and len(futures) == 3
        assert [f.result(timeout=30) for f in futures] == [11, 22, 33]
        assert all(f.started_at is not None for f in futures)  # timed, as one iterable's
        stream = ex.map_futures(tasks.add, range(9), range(9), chunksize=2, buffersize=2)
        assert [f.result(timeout=30) for f in stream] == [2 * i for i in range(9)]


def test_map_futures_with_buffersize_feeds_lazily_and_settles_everything(cluster):
    cluster.start_worker()
    items = Counted(30)
    with cluster.executor() as ex:
        stream = ex.map_futures(tasks.identity, iter(items), chunksize=2, buffersize=3)
        # nobody takes the futures: the feeder stops after `bound` chunks wait here (and
        # holds at most one chunk it read and could not submit)
        wait_for(lambda: ex.progress()["done"] >= 6, what="the first chunks to run")
        assert items.read <= (3 + 1) * 2
        futures = list(stream)
        assert [f.result(timeout=30) for f in futures] == list(range(30))
        assert items.read == 30


def test_shutdown_cancel_futures_stops_a_bounded_map_futures(cluster):
    cluster.start_worker()
    items = Counted()  # endless
    ex = cluster.executor()
    stream = ex.map_futures(tasks.sleep_then, itertools.repeat(0.2), iter(items), chunksize=1,
                            buffersize=4)
    taken = [next(stream) for _ in range(3)]
    ex.shutdown(wait=True, cancel_futures=True)
    read = items.read
    rest = []
    with pytest.raises(RuntimeError, match="not all submitted"):
        for f in stream:
            rest.append(f)
    done, not_done = cf.wait(taken + rest, timeout=30)
    assert not not_done  # every future settled
    assert any(f.cancelled() for f in taken + rest)  # the queued ones
    assert items.read == read  # the feeding stopped at once


def test_close_stops_a_bounded_map_futures(cluster):
    cluster.start_worker()
    items = Counted()
    with cluster.executor() as ex:
        with ex.map_futures(tasks.sleep_then, itertools.repeat(0.1), iter(items),
                            buffersize=3) as stream:
            first = next(stream)
            assert first.result(timeout=30) == 0
        read = items.read
        assert list(stream) == []
        wait_for(lambda: ex.progress()["queued"] == 0 and ex.progress()["running"] == 0,
                 what="the closed feed's chunks to end")
        assert items.read == read


def test_map_futures_items_keep_the_futures_contract(cluster):
    """Item futures are made cheaply (no __init__, a lock made when first used): waiting,
    callbacks, timeouts and cancel still behave as concurrent.futures says."""
    cluster.start_worker()
    with cluster.executor() as ex:
        early = ex.map_futures(tasks.sleep_then, [0.0] * 6, range(6), chunksize=3)
        seen = []
        early[0].add_done_callback(seen.append)  # before it is done
        assert [f.result() for f in cf.as_completed(early, timeout=30)] is not None
        done, not_done = cf.wait(early, timeout=30)
        assert not not_done and [f.result() for f in early] == list(range(6))
        assert seen == [early[0]]
        early[1].add_done_callback(seen.append)  # after: called at once
        assert seen == [early[0], early[1]]
        slow = ex.map_futures(tasks.sleep_then, [30.0], [6])[0]
        with pytest.raises(cf.TimeoutError):
            slow.result(timeout=0.05)  # its chunk is still running
        assert not slow.done()
        assert ex.cancel() >= 1
        assert cf.wait([slow], timeout=30).not_done == set()
        assert slow.cancelled()


def test_shutdown_stops_a_bounded_map_after_what_it_buffered(cluster):
    cluster.start_worker()
    items = Counted()  # endless
    ex = cluster.executor()
    results = ex.map(tasks.identity, iter(items), chunksize=2, buffersize=3)
    assert next(results) == 0
    ex.shutdown(wait=True)  # no cancel: what was submitted runs and is yielded
    read = items.read
    got = [0]
    with pytest.raises(RuntimeError, match="not all submitted"):
        for v in results:
            got.append(v)
    assert got == list(range(read))  # everything read was submitted and is yielded
    assert items.read == read  # nothing more was read after the shutdown


def test_an_error_of_the_input_itself_comes_out_as_it_is(cluster):
    cluster.start_worker()

    def broken():
        yield 1
        yield 2
        raise RuntimeError("the input broke")

    with cluster.executor() as ex:
        results = ex.map(tasks.identity, broken(), buffersize=1)
        assert next(results) == 1
        with pytest.raises(RuntimeError, match="the input broke"):
            list(results)
        futures = []
        with pytest.raises(RuntimeError, match="the input broke"):
            for f in ex.map_futures(tasks.identity, broken(), buffersize=1):
                futures.append(f)
        assert [f.result(timeout=30) for f in futures] == [1, 2]


def test_shutdown_ends_a_waiting_feeder_at_once(cluster):
    cluster.start_worker()
    items = Counted()  # endless
    ex = cluster.executor()
    stream = ex.map_futures(tasks.identity, iter(items), chunksize=2, buffersize=2)
    # both chunks ran; nobody takes their futures, so the feeder waits (before reading more)
    wait_for(lambda: ex.progress()["done"] >= 4, what="the first chunks")
    assert items.read == 4
    ex.shutdown(wait=True)
    stream._thread.join(10)
    assert not stream._thread.is_alive()  # woken by the shutdown, not by a future
    futures = []
    with pytest.raises(RuntimeError, match="not all submitted"):
        for f in stream:
            futures.append(f)
    assert [f.result(timeout=30) for f in futures] == [0, 1, 2, 3]
    assert items.read == 4
