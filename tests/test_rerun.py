"""``MinirayFuture.rerun_locally()``: a failed task re-run in the test's own process, with the
function and argument(s) as they travelled, against a real server and a real worker."""

import os
import traceback
import warnings

import pytest

import miniray
from miniray.broker import connect

pytestmark = pytest.mark.timeout(60)


def parse(text, base=10):
    value = int(text, base)
    if value < 0:
        raise ValueError(f"negative: {value}")  # the line the rerun must show
    return value


_RAISE_LINE = parse.__code__.co_firstlineno + 3


def check_item(x):
    if x == 3:
        raise KeyError(f"item {x}")
    return x * 10


def make_limited(limit):
    box = {"limit": limit}

    def below_limit(x):
        if x >= box["limit"]:
            raise OverflowError(f"{x} >= {box['limit']}")
        return x

    return below_limit, box


def make_fails_elsewhere():
    home = os.getpid()

    def only_here():
        if os.getpid() != home:
            raise RuntimeError("not in the client's process")
        return "fine here"

    return only_here


@pytest.fixture
def ex(cluster):
    e = cluster.executor(job_name="rerun")
    yield e
    e.shutdown(wait=False, cancel_futures=True)


def test_a_failed_submit_raises_here_through_the_users_line(cluster, ex):
    cluster.start_worker()
    f = ex.submit(parse, "-17", base=10)
    assert isinstance(f.exception(timeout=30), ValueError)
    with pytest.raises(ValueError, match="negative: -17") as info:
        f.rerun_locally()
    frames = traceback.extract_tb(info.value.__traceback__)
    assert (__file__, _RAISE_LINE, "parse") in [(s.filename, s.lineno, s.name) for s in frames]
    # a local traceback: no worker's traceback chained, the error is this process's own
    assert not isinstance(info.value.__cause__, miniray.RemoteTraceback)
    # it can be re-run again (the payload stays with the failed future)
    with pytest.raises(ValueError):
        f.rerun_locally()


def test_a_map_futures_item_reruns_with_its_own_argument(cluster, ex):
    cluster.start_worker()
    futures = ex.map_futures(check_item, range(6), chunksize=4)  # item 3 in the first chunk
    assert [f.exception(timeout=30) is None for f in futures] == [True] * 3 + [False] + [True] * 2
    with pytest.raises(KeyError, match="item 3") as info:
        futures[3].rerun_locally()
    assert any(s.name == "check_item" and s.filename == __file__
               for s in traceback.extract_tb(info.value.__traceback__))
    # items that succeeded keep nothing to re-run, not even their failed chunk's payload
    with pytest.raises(miniray.RerunError, match="did not fail"):
        futures[2].rerun_locally()
    assert all(f._rerun is None for i, f in enumerate(futures) if i != 3)


def test_the_function_reruns_as_pickled_not_as_it_is_now(cluster, ex):
    cluster.start_worker()
    fn, box = make_limited(5)
    f = ex.submit(fn, 7)
    assert isinstance(f.exception(timeout=30), OverflowError)
    box["limit"] = 100  # after the submit: the travelled closure still says 5
    with pytest.raises(OverflowError, match="7 >= 5"):
        f.rerun_locally()


def test_clear_errors_for_pending_cancelled_and_successful_futures(cluster, ex):
    pending = ex.submit(parse, "1")  # no worker yet: it waits in the queue
    with pytest.raises(miniray.RerunError, match="has not finished yet"):
        pending.rerun_locally()
    queued = ex.submit(parse, "2")
    assert queued.cancel()
    with pytest.raises(miniray.RerunError, match="was cancelled"):
        queued.rerun_locally()
    cluster.start_worker()
    assert pending.result(timeout=30) == 1
    with pytest.raises(miniray.RerunError, match="did not fail"):
        pending.rerun_locally()


def test_a_rerun_that_succeeds_here_returns_its_value_with_a_warning(cluster, ex):
    cluster.start_worker()
    f = ex.submit(make_fails_elsewhere())
    assert isinstance(f.exception(timeout=30), RuntimeError)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert f.rerun_locally() == "fine here"
    assert [w.filename for w in caught
            if issubclass(w.category, miniray.RerunSucceededWarning)
            and "failed on its worker with RuntimeError, but it did not fail here"
            in str(w.message)] == [__file__], [str(w.message) for w in caught]


def test_an_expired_function_is_said_so(cluster, ex):
    cluster.start_worker()
    f = ex.submit(parse, "-1")
    assert isinstance(f.exception(timeout=30), ValueError)
    r = connect(cluster.url)
    try:  # what MINIRAY_FUNCTION_TTL_SECONDS does, now
        assert r.execute("DEL", f._rerun.keys.fn(f._rerun.sha)) == 1
    finally:
        r.close()
    with pytest.raises(miniray.RerunError, match="no longer on the cluster.*expired"):
        f.rerun_locally()


def test_arguments_over_the_keep_limit_are_not_kept(cluster, monkeypatch):
    monkeypatch.setenv("MINIRAY_RERUN_KEEP_BYTES", "0")
    cluster.start_worker()
    ex = cluster.executor(job_name="rerun-none")
    try:
        f = ex.submit(parse, "-1")
        assert isinstance(f.exception(timeout=30), ValueError)
        with pytest.raises(miniray.RerunError, match="MINIRAY_RERUN_KEEP_BYTES"):
            f.rerun_locally()
    finally:
        ex.shutdown(wait=False)


def test_a_paused_server_does_not_hang_the_rerun(tmp_path, monkeypatch):
    import signal
    import time

    import miniray.client.rerun
    from support import own_server

    monkeypatch.setattr(miniray.client.rerun, "_FETCH_SECONDS", 1.0)
    with own_server(tmp_path, monkeypatch, "rerunpause") as srv:
        ex = miniray.Executor(redis_url=srv.url)
        try:
            f = ex.submit(parse, "-5")
            assert isinstance(f.exception(timeout=30), ValueError)
            os.kill(srv.proc.pid, signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(miniray.ServerError, match="did not give its function back"):
                    f.rerun_locally()
                assert time.monotonic() - t0 < 5
            finally:
                os.kill(srv.proc.pid, signal.SIGCONT)
        finally:
            ex.shutdown(wait=False)
    # the server gone: said so, at once
    with pytest.raises(miniray.ServerError, match="cannot be reached.*shut down"):
        f.rerun_locally()
