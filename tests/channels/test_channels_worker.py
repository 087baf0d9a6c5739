"""Worker: fork + socketpair round trips, size caps, and death in both directions."""

import os
import signal
import subprocess
import sys
import textwrap

import pytest
import workfns
from chanhelpers import PYTHONPATH, wait_gone

from miniray.channels import (ChannelClosedError, FrameTooLargeError, Worker, WorkerDiedError,
                              wait_any)

pytestmark = pytest.mark.timeout(30)

MESSAGES = {
    "json": [1, "two", {"three": [3.0, None, True]}],
    "marshal": (1, b"bytes", {"k": [1.5, None]}, frozenset({1})),
    "pickle": {"set": {1, 2}, "bytes": b"\x00" * 10, "tuple": (1, (2,))},
}


@pytest.mark.parametrize("codec", sorted(MESSAGES))
def test_round_trip_each_codec(codec):
    with Worker(workfns.echo, codec=codec) as w:
        for _ in range(3):
            w.send(MESSAGES[codec])
            assert w.recv(timeout=10) == MESSAGES[codec]


def test_pickle_codec_carries_lambdas_and_closures():
    offset = 41
    with Worker(lambda h: h.send(h.recv()(1)), codec="pickle") as w:
        w.send(lambda x: x + offset)
        assert w.recv(timeout=10) == 42


def test_large_message_round_trip():
    with Worker(workfns.echo, codec="pickle") as w:
        blob = os.urandom(5 * 1024 * 1024)
        w.send(blob)
        assert w.recv(timeout=10) == blob


def test_recv_timeout_then_message():
    def late(h):
        h.send(h.recv())

    with Worker(late) as w:
        with pytest.raises(TimeoutError):
            w.recv(timeout=0.05)
        w.send("now")
        assert w.recv(timeout=10) == "now"


def test_ping_answered_by_worker_in_recv():
    with Worker(workfns.echo) as w:
        assert 0 < w.ping(timeout=10) < 10
        w.send("after ping")
        assert w.recv(timeout=10) == "after ping"


def test_oversized_send_is_refused_and_channel_survives():
    with Worker(workfns.echo, max_size=1024) as w:
        with pytest.raises(FrameTooLargeError, match="max_size=1024"):
            w.send("x" * 2000)
        w.send("small")
        assert w.recv(timeout=10) == "small"


def test_oversized_receive_is_refused_before_allocating():
    with Worker(workfns.forge_huge_frame, max_size=1 << 20) as w:
        with pytest.raises(FrameTooLargeError, match="received a frame of 1000000000000 bytes"):
            w.recv(timeout=10)
        assert w.closed


def test_env_is_set_in_child():
    def env(h):
        h.send(os.environ.get("MINIRAY_TEST_VAR"))

    with Worker(env, env={"MINIRAY_TEST_VAR": "yes"}) as w:
        assert w.recv(timeout=10) == "yes"
    assert "MINIRAY_TEST_VAR" not in os.environ


def test_child_exit_is_seen_by_parent_with_its_code():
    w = Worker(workfns.exit_with)
    w.send(3)
    with pytest.raises(WorkerDiedError, match="exited with code 3") as info:
        w.recv(timeout=10)
    assert info.value.exitcode == 3 and isinstance(info.value, EOFError)
    assert w.wait(5) == 3 and not w.is_alive()


def test_child_killed_is_seen_by_parent():
    w = Worker(workfns.echo)
    w.kill()
    assert w.exitcode == -signal.SIGKILL
    with pytest.raises(ChannelClosedError, match="SIGKILL"):
        w.recv(timeout=10)


def test_child_exception_exits_1(capfd):
    with Worker(workfns.raise_error) as w:
        assert w.wait(10) == 1
    assert "ValueError: boom from the worker" in capfd.readouterr().err


def test_wait_any_returns_ready_workers():
    a, b = Worker(workfns.echo), Worker(workfns.echo)
    try:
        assert wait_any([a, b], timeout=0.05) == []
        b.send("hi")
        assert wait_any([a, b], timeout=10) == [b]
        assert b.recv() == "hi"
        a.kill()
        assert wait_any([a, b], timeout=10) == [a]
    finally:
        a.close()
        b.close()


def test_sibling_channel_not_held_open_by_later_worker():
    first = Worker(workfns.echo)
    second = Worker(workfns.echo)  # forked while `first` is open: must not keep it alive
    first.send("x")
    first.recv(timeout=10)
    first.close()
    assert first.exitcode == 0
    second.close()


def test_parent_death_kills_child(tmp_path):
    script = textwrap.dedent("""
        import sys, time, workfns
        from miniray.channels import Worker
        w = Worker(workfns.sleep_forever)
        print(w.recv(timeout=10), flush=True)
        time.sleep(60)
    """)
    parent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                              env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    child_pid = int(parent.stdout.readline())
    assert not wait_gone(child_pid, timeout=0.2)
    parent.kill()
    parent.wait()
    parent.stdout.close()
    assert wait_gone(child_pid, timeout=10), "child outlived its parent"


def test_unknown_codec_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown codec 'yaml'"):
        Worker(workfns.echo, codec="yaml")
