"""The concurrent.futures contract, written once and run against ThreadPoolExecutor and
ProcessPoolExecutor (the controls) and miniray.Executor."""

import asyncio
import concurrent.futures as cf
import threading
import time

import pytest

import tasks


@pytest.fixture(params=["thread", "process", "miniray"])
def make_executor(request):
    made = []

    def make():
        if request.param == "thread":
            ex = cf.ThreadPoolExecutor(2)
        elif request.param == "process":
            ex = cf.ProcessPoolExecutor(2)
        else:
            cluster = request.getfixturevalue("two_workers")
            ex = cluster.executor()
        made.append(ex)
        return ex

    make.kind = request.param
    yield make
    for ex in made:
        ex.shutdown(wait=True, cancel_futures=True)


def test_submit_returns_future_with_result(make_executor):
    ex = make_executor()
    f = ex.submit(tasks.add, 1, 2, c=3)
    assert isinstance(f, cf.Future)
    assert f.result(timeout=30) == 6
    assert f.done() and not f.cancelled() and f.exception() is None


def test_exception_is_the_original_type(make_executor):
    ex = make_executor()
    f = ex.submit(tasks.raise_custom, "boom", 7)
    with pytest.raises(tasks.CustomError) as info:
        f.result(timeout=30)
    assert info.value.args == ("boom", 7)
    assert info.value.code == 7
    assert isinstance(f.exception(), tasks.CustomError)


def test_map_is_ordered_and_lazy_about_errors(make_executor):
    ex = make_executor()
    assert list(ex.map(tasks.square, range(50), chunksize=7)) == [x * x for x in range(50)]
    assert list(ex.map(tasks.add, [1, 2], [10, 20])) == [11, 22]
    it = ex.map(tasks.raise_value_error, range(6))
    assert [next(it), next(it), next(it)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(it)


def test_map_timeout(make_executor):
    ex = make_executor()
    it = ex.map(tasks.sleep_then, [5], timeout=0.2)
    with pytest.raises(cf.TimeoutError):
        list(it)


def test_map_rejects_bad_chunksize(make_executor):
    if make_executor.kind == "thread":
        pytest.skip("ThreadPoolExecutor ignores chunksize")
    ex = make_executor()
    with pytest.raises(ValueError):
        ex.map(tasks.square, range(3), chunksize=0)


def test_as_completed_and_wait(make_executor):
    ex = make_executor()
    fs = [ex.submit(tasks.sleep_then, 0.3 if i == 0 else 0.0, i) for i in range(6)]
    order = [f.result() for f in cf.as_completed(fs, timeout=30)]
    assert sorted(order) == list(range(6))
    done, not_done = cf.wait(fs, timeout=30)
    assert len(done) == 6 and not not_done
    slow = ex.submit(tasks.sleep_then, 2, "slow")
    done, not_done = cf.wait([slow], timeout=0.1)
    assert not done and not_done == {slow}
    assert cf.wait(fs + [slow], return_when=cf.FIRST_COMPLETED, timeout=30).done


def test_result_timeout_raises_timeouterror(make_executor):
    ex = make_executor()
    f = ex.submit(tasks.sleep_then, 1.5, "late")
    with pytest.raises(cf.TimeoutError):
        f.result(timeout=0.05)
    assert f.result(timeout=30) == "late"


def test_done_callbacks_run_once_and_errors_in_them_do_not_break(make_executor):
    ex = make_executor()
    seen = []
    f = ex.submit(tasks.identity, 5)

    def bad(_):
        raise RuntimeError("callback error is logged, not raised")

    f.add_done_callback(bad)
    f.add_done_callback(lambda fut: seen.append(fut.result()))
    assert f.result(timeout=30) == 5
    deadline = time.monotonic() + 5
    while not seen and time.monotonic() < deadline:
        time.sleep(0.01)
    f.add_done_callback(lambda fut: seen.append("late"))  # already done: runs at once
    assert seen == [5, "late"]


def test_cancel_a_queued_future(make_executor):
    ex = make_executor()
    blockers = [ex.submit(tasks.sleep_then, 1.0) for _ in range(2)]
    time.sleep(0.3)  # both workers busy
    queued = [ex.submit(tasks.identity, i) for i in range(20)]
    cancelled = [f for f in queued if f.cancel()]
    assert cancelled, "a queued task behind busy workers can be cancelled"
    for f in cancelled:
        assert f.cancelled() and f.done()
        with pytest.raises(cf.CancelledError):
            f.result()
    for f in queued:
        if not f.cancelled():
            assert f.result(timeout=30) in range(20)
    for b in blockers:
        b.result(timeout=30)


def test_cancel_ends_another_threads_wait(make_executor):
    """A thread waits in result() for a queued task; another thread cancels it: the wait
    ends with CancelledError."""
    ex = make_executor()
    blockers = [ex.submit(tasks.sleep_then, 1.5) for _ in range(2)]
    time.sleep(0.3)  # both workers busy
    queued = [ex.submit(tasks.identity, i) for i in range(6)]  # the last ones wait their turn
    victim = queued[-1]
    got = []
    waiter = threading.Thread(target=lambda: got.append(_outcome(victim)))
    waiter.start()
    time.sleep(0.2)  # it waits
    assert victim.cancel()
    waiter.join(30)
    assert got == ["cancelled"]
    assert [f.result(timeout=30) for f in queued[:-1]] == list(range(5))
    for b in blockers:
        b.result(timeout=30)


def _outcome(f):
    try:
        return f.result(timeout=30)
    except cf.CancelledError:
        return "cancelled"


def test_cancel_a_finished_future_is_false(make_executor):
    ex = make_executor()
    f = ex.submit(tasks.identity, 1)
    assert f.result(timeout=30) == 1
    assert f.cancel() is False
    assert not f.cancelled()


def test_submit_after_shutdown_raises_runtimeerror(make_executor):
    ex = make_executor()
    ex.shutdown()
    with pytest.raises(RuntimeError):
        ex.submit(tasks.identity, 1)


def test_shutdown_wait_completes_everything(make_executor):
    ex = make_executor()
    fs = [ex.submit(tasks.sleep_then, 0.05, i) for i in range(8)]
    ex.shutdown(wait=True)
    assert all(f.done() for f in fs)
    assert [f.result() for f in fs] == list(range(8))


def test_shutdown_cancel_futures(make_executor):
    ex = make_executor()
    fs = [ex.submit(tasks.sleep_then, 0.2, i) for i in range(30)]
    time.sleep(0.1)
    ex.shutdown(wait=True, cancel_futures=True)
    assert all(f.done() for f in fs)
    assert any(f.cancelled() for f in fs)
    for f in fs:
        if not f.cancelled():
            assert f.result() in range(30)


def test_context_manager(make_executor):
    with make_executor() as ex:
        f = ex.submit(tasks.square, 9)
    assert f.done() and f.result() == 81


def test_asyncio_wrap_future_and_run_in_executor(make_executor):
    ex = make_executor()

    async def main():
        loop = asyncio.get_running_loop()
        a = await asyncio.wrap_future(ex.submit(tasks.square, 4))
        b = await loop.run_in_executor(ex, tasks.add, 1, 2)
        return a, b

    assert asyncio.run(main()) == (16, 3)


def test_many_threads_submitting(make_executor):
    ex = make_executor()
    results = []
    lock = threading.Lock()

    def client(k):
        fs = [ex.submit(tasks.add, k, i) for i in range(25)]
        with lock:
            results.extend(f.result(timeout=60) for f in fs)

    threads = [threading.Thread(target=client, args=(k * 100,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(results) == sorted(k * 100 + i for k in range(4) for i in range(25))


def test_threads_waiting_at_once_each_get_their_result(make_executor):
    """Waiters on different futures, none of them first: whichever thread reads delivers
    the others' results too."""
    ex = make_executor()
    futures = [ex.submit(tasks.sleep_then, d, i) for i, d in enumerate([0.6, 0.1, 0.3, 0.0])]
    got = {}

    def wait(i):
        got[i] = futures[i].result(timeout=60)

    threads = [threading.Thread(target=wait, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {0: 0, 1: 1, 2: 2, 3: 3}


def test_a_future_only_polled_with_done_completes(make_executor):
    ex = make_executor()
    f = ex.submit(tasks.add, 2, 3)
    deadline = time.monotonic() + 30
    while not f.done() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert f.done() and f._result == 5  # (result() was never called)


def test_a_callback_fires_with_nobody_waiting(make_executor):
    ex = make_executor()
    fired = threading.Event()
    ex.submit(tasks.add, 2, 3).add_done_callback(lambda f: fired.set())
    assert fired.wait(30)


def test_a_wait_in_result_interrupted_by_a_signal_can_wait_again(make_executor):
    """Ctrl-C in a notebook while result() waits: the next result() still gets the value,
    and the executor goes on working."""
    import signal

    class Interrupted(Exception):
        pass

    def interrupt(signum, frame):
        raise Interrupted

    ex = make_executor()
    f = ex.submit(tasks.sleep_then, 0.8, "late")
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        with pytest.raises(Interrupted):
            f.result(timeout=30)
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    assert f.result(timeout=30) == "late"
    assert ex.submit(tasks.add, 1, 1).result(timeout=30) == 2


class _Dummy:
    def method(self):
        return 1


def _make_dummy(_):
    return _Dummy()


def test_map_iterator_keeps_no_reference_to_yielded_results(make_executor):
    # CPython issue #14406
    import gc
    import weakref

    ex = make_executor()
    for obj in ex.map(_make_dummy, range(10)):
        wr = weakref.ref(obj)
        del obj
        gc.collect()
        assert wr() is None


def test_executor_keeps_no_stale_reference_to_submitted_callables(make_executor):
    # CPython issue #16284: a discarded future must not keep its callable's object alive
    import gc
    import weakref

    ex = make_executor()
    obj = _Dummy()
    collected = threading.Event()
    _ref = weakref.ref(obj, lambda _: collected.set())
    ex.submit(obj.method).result(timeout=30)
    del obj
    deadline = time.monotonic() + 10
    while not collected.is_set() and time.monotonic() < deadline:
        gc.collect()
        time.sleep(0.05)
    assert collected.is_set(), "the executor kept a reference to the submitted callable"


def test_max_workers_must_be_positive(make_executor):
    import miniray

    kinds = {"thread": cf.ThreadPoolExecutor, "process": cf.ProcessPoolExecutor,
             "miniray": miniray.Executor}
    for n in (0, -1):
        with pytest.raises(ValueError, match="max_workers must be greater than 0"):
            kinds[make_executor.kind](max_workers=n)


def _make(kind, request, **kwargs):
    if kind == "thread":
        return cf.ThreadPoolExecutor(2, **kwargs)
    if kind == "process":
        return cf.ProcessPoolExecutor(2, **kwargs)
    return request.getfixturevalue("two_workers").executor(**kwargs)


def test_initializer_runs_before_tasks(make_executor, request):
    ex = _make(make_executor.kind, request, initializer=tasks.set_init_status,
               initargs=("initialized",))
    try:
        fs = [ex.submit(tasks.get_init_status) for _ in range(4)]
        assert [f.result(timeout=30) for f in fs] == ["initialized"] * 4
    finally:
        ex.shutdown(cancel_futures=True)


def test_failing_initializer_breaks_the_tasks(make_executor, request):
    ex = _make(make_executor.kind, request, initializer=tasks.failing_initializer)
    try:
        f = ex.submit(tasks.identity, 1)
        with pytest.raises(cf.BrokenExecutor):
            f.result(timeout=30)
    finally:
        ex.shutdown(wait=False, cancel_futures=True)
