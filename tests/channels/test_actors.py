"""Actors: state across calls, ordered futures, remote exceptions, death, pools, remote hosts."""

import os
import signal
from concurrent.futures import Future

import pytest
from chanhelpers import wait_gone
from workfns import BrokenInit, Counter

from miniray.channels.actors import ActorPool, actor
from miniray.channels import ActorDiedError, RemoteTraceback, RemoteWorker

pytestmark = pytest.mark.timeout(60)


@pytest.fixture
def counter():
    handle = actor(Counter, start=10)
    yield handle
    handle.close()


def test_state_is_kept_across_calls_in_order(counter):
    futures = [counter.add(1) for _ in range(50)]
    assert all(isinstance(f, Future) for f in futures)
    assert [f.result(timeout=10) for f in futures] == list(range(11, 61))
    assert counter.add(k=0).result(timeout=10) == 60


def test_actor_runs_in_its_own_process(counter):
    assert counter.pid().result(timeout=10) != os.getpid()


def test_exception_keeps_type_and_remote_traceback(counter):
    with pytest.raises(KeyError, match="missing") as info:
        counter.fail("missing").result(timeout=10)
    cause = info.value.__cause__
    assert isinstance(cause, RemoteTraceback)
    assert "in fail" in str(cause) and "raise KeyError(message)" in str(cause)
    assert counter.add(1).result(timeout=10) == 11  # the actor survives its exceptions


def test_unpicklable_result_is_reported_not_dropped(counter):
    with pytest.raises(TypeError, match="result of unpicklable_result"):
        counter.unpicklable_result().result(timeout=10)
    assert counter.add(1).result(timeout=10) == 11


def test_unpicklable_argument_fails_only_that_call(counter):
    import threading

    with pytest.raises(TypeError):
        counter.add(threading.Lock()).result(timeout=10)
    assert counter.add(1).result(timeout=10) == 11


def test_killed_actor_fails_pending_and_later_calls(counter):
    pid = counter.pid().result(timeout=10)
    pending = counter.slow(30)
    os.kill(pid, signal.SIGKILL)
    with pytest.raises(ActorDiedError, match="Counter.*died.*SIGKILL"):
        pending.result(timeout=10)
    with pytest.raises(ActorDiedError):
        counter.add(1).result(timeout=10)
    assert not counter.alive


def test_actor_that_exits_mid_call(counter):
    with pytest.raises(ActorDiedError, match="exited with code 7"):
        counter.die().result(timeout=10)


def test_failing_init_fails_every_call():
    handle = actor(BrokenInit)
    with pytest.raises(RuntimeError, match="cannot construct"):
        handle.ready.result(timeout=10)
    with pytest.raises(ActorDiedError, match="failed in __init__"):
        handle.anything().result(timeout=10)
    handle.close()


def test_close_runs_sent_calls_then_stops():
    handle = actor(Counter)
    pid = handle.pid().result(timeout=10)
    last = handle.add(5)
    handle.close()
    assert last.result(timeout=10) == 5
    assert wait_gone(pid, timeout=10)
    with pytest.raises(ActorDiedError, match="closed"):
        handle.add(1).result(timeout=10)


def test_actor_pool_map_spreads_and_orders():
    actors = [actor(Counter) for _ in range(3)]
    try:
        pool = ActorPool(actors)
        pids = list(pool.map(lambda a, _: a.pid(), range(30)))
        assert len(set(pids)) == 3
        assert list(pool.map(lambda a, x: a.slow(x), [0.2, 0.0, 0.1, 0.0])) == [0.2, 0, 0.1, 0]
        assert sorted(pool.map_unordered(lambda a, x: a.slow(x), [0.1, 0.0])) == [0.0, 0.1]
    finally:
        for a in actors:
            a.close()


def test_actor_on_a_remote_worker_server(start_server):
    server = start_server("miniray.channels.actors.actor_main")
    for where in (f"{server.host}:{server.port}",
                  RemoteWorker(server.host, server.port, codec="pickle")):
        handle = actor(Counter, 1, where=where)
        try:
            assert handle.add(2).result(timeout=10) == 3
            assert handle.pid().result(timeout=10) != server.pid
            with pytest.raises(KeyError):
                handle.fail("remote").result(timeout=10)
        finally:
            handle.close()
