"""The notebook map fed lazily (``--buffersize``, ``jupyter_ext.feed``): a huge EXPR is not
pickled up front, the view still counts against its total, a cancel ends it; real server,
real workers, a real InteractiveShell."""

import functools
from collections.abc import Sequence

import pytest

import tasks
from support import wait_for

pytest.importorskip("IPython")

from jupyter_ext.run import MapRun  # noqa: E402

pytestmark = pytest.mark.timeout(60)


class Counted(Sequence):
    """A sequence that records the highest index read from it."""

    def __init__(self, n):
        self.n, self.top = n, -1

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not 0 <= i < self.n:
            raise IndexError(i)
        self.top = max(self.top, i)
        return i


def test_a_lazily_fed_run_reads_its_items_as_chunks_finish(cluster):
    cluster.start_worker()
    items = Counted(60)
    run = MapRun(functools.partial(tasks.sleep_then, 0.02), items, redis_url=cluster.url,
                 chunksize=2, buffersize=3, view="text")
    assert run._feed is not None and run.model.total == 60
    while not run.done():
        top = items.top  # (first: what was read can only be bounded by what finished since)
        finished = run.model.done
        # the chunks finished, at most `buffersize` unfinished, and one read and waiting
        assert top < (finished // 2 + 3 + 1) * 2
        run.wait(0.01)
    assert run.result(timeout=30) == list(range(60))


def test_a_huge_range_is_not_pickled_up_front_and_a_cancel_ends_it(cluster):
    cluster.start_worker()
    run = MapRun(functools.partial(tasks.sleep_then, 0.002), range(10_000_000),
                 redis_url=cluster.url, chunksize=100, buffersize=2, view="text")
    assert run.model.total == 10_000_000  # the view counts against the whole
    wait_for(lambda: run.model.done >= 100, what="a first chunk")
    submitted = run.executor._n_items  # (first: then what finished can only be more)
    assert submitted <= (run.model.done // 100 + 2 + 1) * 100  # a few chunks, not 10 M
    run.cancel()
    assert run.wait(30)
    results = run.results(missing=None)
    assert len(results) == 10_000_000 and results[:100] == list(range(100))
    p = run.progress()
    assert p["state"] == "cancelled" and p["done"] + p["cancelled"] == 10_000_000


def test_the_magic_bounds_a_big_map_by_default_and_takes_buffersize(cluster):
    from IPython.core.interactiveshell import InteractiveShell

    sh = InteractiveShell.instance()
    try:
        sh.run_line_magic("load_ext", "miniray")
        sh.run_line_magic("miniray", f"connect {cluster.url}")
        cluster.start_worker()
        sh.user_ns["items"] = items = Counted(300)
        out = sh.run_cell_magic("miniray", "map x in items --chunksize 10 --buffersize 2",
                                "x * 2")
        assert out == [2 * x for x in range(300)]
        run = sh.magics_manager.registry["MinirayMagics"].runs[-1]
        assert run._feed is not None and run.model.total == 300 and items.top == 299
        # a small map under the default bound goes at once, as before
        assert sh.run_cell_magic("miniray", "map x in range(5)", "x + 1") == [1, 2, 3, 4, 5]
        assert sh.magics_manager.registry["MinirayMagics"].runs[-1]._feed is None
        from IPython.core.error import UsageError

        with pytest.raises(UsageError, match="--buffersize must be >= 0"):
            sh.run_cell_magic("miniray", "map x in range(5) --buffersize -1", "x")
    finally:
        InteractiveShell.clear_instance()
