"""Cached map items (``cache=True``, ``%%miniray map --cache``) against a real server and real
workers: a side-effect log (one line per run, written by the task) proves what ran."""

import io
import time
from contextlib import redirect_stdout

import pytest

import miniray
from miniray.client import cache
from miniray.cli import main as cli_main

pytestmark = pytest.mark.timeout(60)


def counted(log, scale=10, fail_at=()):
    """A task that appends its item to ``log`` (a run) and returns ``item * scale``."""
    def task(x):
        with open(log, "a") as f:
            f.write(f"{x}\n")
        if x in fail_at:
            raise ValueError(f"bad item {x}")
        return x * scale
    return task


def runs(log):
    try:
        with open(log) as f:
            return [int(v) if v.isdigit() else v for v in f.read().split()]
    except FileNotFoundError:
        return []


class Restless:
    """An item whose pickle differs every time it is pickled: it cannot be a cache key."""

    def __reduce__(self):
        return str, (f"t{time.perf_counter_ns()}",)


@pytest.fixture
def ex(cluster):
    cluster.start_worker(name="w0")
    with cluster.executor() as e:
        yield e


def test_second_map_runs_nothing_and_gives_the_same_results(ex, tmp_path):
    log = tmp_path / "runs"
    first = list(ex.map(counted(log), range(8), cache=True, chunksize=3))
    assert first == [x * 10 for x in range(8)] and sorted(runs(log)) == list(range(8))
    again = list(ex.map(counted(log), range(8), cache=True))  # a new function object
    assert again == first
    assert len(runs(log)) == 8  # nothing ran
    futures = ex.map_futures(counted(log), range(8), cache=True)
    assert [f.result(10) for f in futures] == first
    assert all(f.cached and f.done() for f in futures) and len(runs(log)) == 8


def test_without_cache_nothing_is_stored_or_read(ex, tmp_path):
    log = tmp_path / "runs"
    assert list(ex.map(counted(log), range(4))) == [0, 10, 20, 30]
    ex.shutdown()
    assert cache.stats(ex.redis_url)["entries"] == 0
    with miniray.Executor(redis_url=ex.redis_url) as e2:
        list(e2.map(counted(log), range(4), cache=True))
        assert len(runs(log)) == 8
        assert [f.result(10) for f in e2.map_futures(counted(log), range(4))] == [0, 10, 20, 30]
    assert len(runs(log)) == 12  # without cache=True it ran again


def test_a_changed_item_runs_that_item_only(ex, tmp_path):
    log = tmp_path / "runs"
    fs = ex.map_futures(counted(log), range(6), cache=True, chunksize=2)
    assert [f.result(10) for f in fs] == [0, 10, 20, 30, 40, 50]
    fs = ex.map_futures(counted(log), [0, 1, 2, 99, 4, 5], cache=True, chunksize=2)
    assert [f.result(10) for f in fs] == [0, 10, 20, 990, 40, 50]
    assert [f.cached for f in fs] == [True, True, True, False, True, True]
    assert runs(log)[6:] == [99]


def test_a_changed_function_runs_everything(ex, tmp_path):
    log = tmp_path / "runs"
    list(ex.map(counted(log), range(5), cache=True))
    # another captured value: all run again
    assert list(ex.map(counted(log, scale=3), range(5), cache=True)) == [0, 3, 6, 9, 12]
    assert len(runs(log)) == 10

    def other_body(x):  # the same captured value, another body
        with open(log, "a") as f:
            f.write(f"{x}\n")
        return x * 10 + 1
    assert list(ex.map(other_body, range(5), cache=True)) == [1, 11, 21, 31, 41]
    assert len(runs(log)) == 15
    list(ex.map(counted(log, scale=3), range(5), cache=True))  # each is cached on its own
    list(ex.map(other_body, range(5), cache=True))
    assert len(runs(log)) == 15


def test_a_failing_item_is_not_cached(ex, tmp_path):
    log = tmp_path / "runs"
    fs = ex.map_futures(counted(log, fail_at=(3,)), range(5), cache=True)
    assert isinstance(fs[3].exception(10), ValueError)
    assert [f.result(10) for i, f in enumerate(fs) if i != 3] == [0, 10, 20, 40]
    fs = ex.map_futures(counted(log, fail_at=(3,)), range(5), cache=True)
    assert isinstance(fs[3].exception(10), ValueError) and not fs[3].cached
    assert runs(log)[5:] == [3]  # only the failed item ran again
    # map: the error is raised at its place, as without the cache
    with pytest.raises(ValueError, match="bad item 3"):
        list(ex.map(counted(log, fail_at=(3,)), range(5), cache=True))


def test_an_item_without_a_stable_pickle_runs_every_time(ex, tmp_path):
    log = tmp_path / "runs"
    task = counted(log)
    items = [1, Restless(), 2]
    for _ in range(2):
        fs = ex.map_futures(task, items, cache=True)
        values = [f.result(10) for f in fs]
        assert values[0] == 10 and values[2] == 20 and values[1].startswith("t")
    assert len(runs(log)) == 4  # the second map ran the restless item only
    assert [f.cached for f in fs] == [True, False, True]
    cache.flush_for(ex)
    assert cache.stats(ex.redis_url)["entries"] == 2  # its result was never stored


def test_several_iterables_and_a_plain_item_do_not_share_keys(ex, tmp_path):
    def pair(a, b=None):
        return (a, b)
    assert list(ex.map(pair, [1, 2], [3, 4], cache=True)) == [(1, 3), (2, 4)]
    # the single item (1, 3) is not the arguments 1, 3
    assert list(ex.map(pair, [(1, 3)], cache=True)) == [((1, 3), None)]


def test_the_size_cap_evicts_the_oldest_and_skips_what_cannot_fit(cluster, monkeypatch,
                                                                  tmp_path):
    one = len(cache._cp(b"x" * 100))
    monkeypatch.setenv("MINIRAY_CACHE_MAX_BYTES", str(3 * one))
    cluster.start_worker(name="w0")
    log = tmp_path / "runs"

    def blob(x):
        with open(log, "a") as f:
            f.write(f"{x}\n")
        return b"x" * (100 if x < 10 else 10_000)
    with cluster.executor() as e:
        list(e.map(blob, range(6), cache=True))  # read (and so stored) in order
        e.shutdown()
        st = cache.stats(e.redis_url)
        assert st == {"entries": 3, "bytes": 3 * one}
    with cluster.executor() as e:
        list(e.map(blob, range(6), cache=True))
        assert runs(log)[6:] == [0, 1, 2]  # the oldest three were evicted
        list(e.map(blob, [10], cache=True))  # bigger than the whole cache: not stored
        e.shutdown()
        assert cache.stats(e.redis_url)["bytes"] <= 3 * one
    with cluster.executor() as e:
        list(e.map(blob, [10], cache=True))
    assert runs(log)[-2:] == [10, 10]


def test_cache_clear(ex, tmp_path):
    log = tmp_path / "runs"
    list(ex.map(counted(log), range(6), cache=True))
    assert ex.cache_clear() == 6
    list(ex.map(counted(log), range(6), cache=True))
    assert len(runs(log)) == 12
    out = io.StringIO()
    with redirect_stdout(out):
        cli_main(["cache", "clear", "--redis", ex.redis_url])
    assert "6 entries removed" in out.getvalue()
    list(ex.map(counted(log), range(6), cache=True))
    assert len(runs(log)) == 18


def test_cached_items_in_the_notebook(cluster, tmp_path, capsys):
    """``%%miniray map x in range(6) -o a --cache`` twice: the second run says 6 cached and
    runs nothing; a one-line change of the body runs all 6 again."""
    pytest.importorskip("IPython")
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    import sys

    cluster.start_worker(name="w0")
    hooks = sys.displayhook, sys.excepthook
    sh = InteractiveShell.instance()
    try:
        sh.run_line_magic("load_ext", "miniray")
        sh.run_line_magic("miniray", f"connect {cluster.url}")
        log = tmp_path / "runs"
        sh.user_ns["LOG"] = str(log)
        body = "open(LOG, 'a').write(f'{x}\\n')\nx * 10\n"
        line = "map x in range(6) -o a --cache"
        sh.run_cell_magic("miniray", line, body)
        assert sh.user_ns["a"] == [0, 10, 20, 30, 40, 50] and len(runs(log)) == 6
        run = sh.magics_manager.registry["MinirayMagics"].runs[-1]
        assert run.progress()["cached"] == 0
        capsys.readouterr()
        sh.run_cell_magic("miniray", line, body)
        run = sh.magics_manager.registry["MinirayMagics"].runs[-1]
        assert sh.user_ns["a"] == [0, 10, 20, 30, 40, 50] and len(runs(log)) == 6
        assert run.progress()["cached"] == 6 and run.progress()["done"] == 6
        assert "6/6 done, 6 cached" in capsys.readouterr().out  # the text fallback
        from jupyter_ext.snapshot import snapshot_html

        assert "miniray-bar-cached" in snapshot_html(run.model, run.log_buffer)
        sh.run_cell_magic("miniray", line, body.replace("x * 10", "x * 10 + 1"))
        assert sh.user_ns["a"] == [1, 11, 21, 31, 41, 51] and len(runs(log)) == 12
        assert sh.magics_manager.registry["MinirayMagics"].runs[-1].progress()["cached"] == 0
        sh.run_line_magic("miniray", "cache")
        assert "item cache holds 12 entries" in capsys.readouterr().out
        sh.run_line_magic("miniray", "cache clear")
        assert "item cache cleared (12 entries removed)" in capsys.readouterr().out
        sh.run_line_magic("miniray", "cache")
        assert "item cache holds 0 entries" in capsys.readouterr().out
        with pytest.raises(UsageError, match="usage: %miniray cache"):
            sh.run_line_magic("miniray", "cache drop")
    finally:
        sh.run_line_magic("miniray", "down")
        InteractiveShell.clear_instance()
        sys.displayhook, sys.excepthook = hooks


def test_a_captured_value_changed_in_place_is_seen(ex):
    """The same function object, its captured list changed between two maps of one executor:
    the second map pickles it again (what travels is what the key says)."""
    scale = [10]

    def times(x):
        return x * scale[0]
    assert list(ex.map(times, range(3), cache=True)) == [0, 10, 20]
    scale[0] = 20
    assert list(ex.map(times, range(3), cache=True)) == [0, 20, 40]
    fs = ex.map_futures(times, range(3), cache=True)
    assert [f.result(10) for f in fs] == [0, 20, 40] and all(f.cached for f in fs)


def test_the_live_widget_counts_cached_items_in_their_own_colour(cluster, tmp_path):
    pytest.importorskip("anywidget")
    from jupyter_ext.run import MapRun

    cluster.start_worker(name="w0")
    log = tmp_path / "runs"
    for _ in range(2):
        run = MapRun(counted(log), range(6), redis_url=cluster.url, view="widget", cache=True)
        assert run.wait(30)
        run.settle()
    head = run.view.widget.head
    assert 'class="miniray-bar-cached"' in head and "--jp-success-color2" in head
    assert 'class="miniray-bar-done"' not in head  # every item came from the cache
    assert "6 cached" in head and "100%" in head and len(runs(log)) == 6
    assert run.progress()["cached"] == 6 and run.results() == [0, 10, 20, 30, 40, 50]


def test_cached_items_in_a_real_kernel(cluster, tmp_path):
    """A real kernel (jupyter_client): the second ``--cache`` run's final display says 6
    cached and nothing ran; an edited body runs all 6."""
    pytest.importorskip("jupyter_client")
    from kernels import Kernel

    cluster.start_worker(name="w0")
    log = tmp_path / "runs"
    k = Kernel()
    try:
        k.run(f"%load_ext miniray\n%miniray connect {cluster.url}\nLOG = {str(log)!r}")
        cell = "%%miniray map x in range(6) -o a --cache\nopen(LOG, 'a').write(f'{x}\\n')\nx * 10"

        def shown(out):
            return "\n".join(d.get("text/plain", "") for d in out["data"]) + out["stream"]
        first = k.run(cell)
        assert len(runs(log)) == 6 and "cached" not in shown(first)
        second = k.run(cell)
        assert "6/6 done, 6 cached" in shown(second), shown(second)
        assert len(runs(log)) == 6
        k.run(cell.replace("x * 10", "x * 10 + 1"))
        assert len(runs(log)) == 12
        out = k.run("print(a)")
        assert "[1, 11, 21, 31, 41, 51]" in out["stream"]
    finally:
        k.close()


def test_the_store_script_evicts_the_oldest_even_within_one_batch(cluster):
    from miniray.broker import Broker, connect

    r = connect(cluster.url)
    try:
        b = Broker(r, cluster.namespace)
        entries = [(f"f:{name}", b"v" * 10) for name in "zyxwvu"]  # (not in sorted order)
        assert b.cache_store(60, 30, entries) == 3
        k = b.keys
        assert [m.decode() for m in r.execute("ZRANGE", k.cache_index, 0, -1)] == \
            ["f:w", "f:v", "f:u"]  # the newest three
        assert r.execute("GET", k.cache_bytes) == b"30"
        assert r.execute("EXISTS", k.cache("f", "z"), k.cache("f", "u")) == 1
        assert 0 < r.execute("TTL", k.cache("f", "u")) <= 60
        assert b.cache_store(60, 30, [("f:big", b"v" * 31)]) == 0  # never fits: not stored
        assert r.execute("EXISTS", k.cache("f", "big")) == 0
        assert b.cache_clear() == 3
        assert r.execute("ZCARD", k.cache_index) == 0
    finally:
        r.close()


def test_a_hung_server_does_not_hold_a_cached_map(tmp_path, monkeypatch):
    """SIGSTOP of the server before a ``cache=True`` map's lookup (first while the lookup
    connects, then on a connection it has): the map is submitted after a bounded wait (the
    lookup gives up: every item runs) and settles once the server answers again."""
    import os
    import signal
    import threading

    from support import own_server

    monkeypatch.setattr(cache, "_LOOKUP_SECONDS", 1.0)
    monkeypatch.setattr(cache, "_FLUSH_SECONDS", 1.0)
    log = tmp_path / "runs"
    with own_server(tmp_path, monkeypatch, "hungcache") as srv, \
            miniray.Executor(redis_url=srv.url) as e:
        for scale in (2, 3):
            os.kill(srv.proc.pid, signal.SIGSTOP)
            got = []
            try:
                t = threading.Thread(target=lambda: got.append(
                    e.map_futures(counted(log, scale=scale), range(3), cache=True)),
                    daemon=True)
                t.start()
                t.join(10)
                assert got, "a cache=True map waited for a hung server"
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
            assert [f.result(30) for f in got[0]] == [0, scale, 2 * scale]
            # a lookup that connects (the server answers): the next one has a connection
            assert list(e.map(counted(log, scale=scale), range(3), cache=True)) == \
                [0, scale, 2 * scale]


def test_lookups_take_one_round_trip_per_batch(cluster):
    """2,500 items are looked up with 3 MGETs (batches of 1,024), whatever is found."""
    from miniray.broker import connect

    r = connect(cluster.url)

    def mgets():
        for line in r.execute("INFO", "commandstats").decode().splitlines():
            if line.startswith("cmdstat_mget:"):
                return int(line.split("calls=")[1].split(",")[0])
        return 0
    try:
        c = cache.ItemCache(cluster.url, cluster.namespace)  # (no workers: nobody else MGETs)
        keys = [cache.argument_key("m1", i) for i in range(2500)]
        r.execute("SET", c.keys.cache("f", keys[7]), cache._cp("seven"))
        before = mgets()
        assert c.lookup("f", keys) == {7: "seven"}
        assert mgets() - before == 3
    finally:
        r.close()
