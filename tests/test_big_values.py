"""Large values through the server (``miniray.values.bigvalues``): out-of-band buffers travel beside
their message, in parts no bigger than the server takes, and are read straight into one
buffer. They round-trip exactly in both directions, whatever their sizes against the part
size; the client's and the task's peak memory stay near the values they hold; a buffer gone
from the server fails its own task, clearly; nothing is left on the server."""

import subprocess
import sys

import numpy as np
import pytest

import big_tasks
import miniray
import tasks
from miniray.values import bigvalues
from miniray.errors import MinirayError
from miniray.values.payloads import big_part_size
from miniray.protocol import _Failed
from support import own_server, wait_for, worker_env

pytestmark = pytest.mark.timeout(120)

MB = 1024 * 1024


def _big_keys(r, ns):
    return r.execute("KEYS", f"{ns}:big:*")


def _value(seed, part):
    """Several big buffers in one value: none a multiple of the part size but one that is
    exactly two parts, dtypes of 1, 4 and 8 bytes, and a small one that stays in band."""
    rng = np.random.default_rng(seed)
    return {
        "f": rng.random((5 * MB // 2 + 3) // 8),  # 2.5 MB and a bit: parts, a ragged tail
        "u": rng.integers(0, 256, 3 * MB + 17, dtype=np.uint8),
        "i": rng.integers(-2**31, 2**31, 2 * part // 4, dtype=np.int32),  # two parts exactly
        "s": rng.integers(0, 9, 100, dtype=np.int64),  # small: in the message
    }


def _same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape, k
        assert np.array_equal(a[k], b[k]), k


def test_values_in_parts_round_trip_exactly_both_ways(tmp_path, monkeypatch):
    """A server that takes 1 MB per value: arguments and results of several buffers each,
    in a submit and in a map chunk of two, arrive byte for byte; every buffer went beside its
    message (none inline), and the server keeps none of them afterwards."""
    monkeypatch.setenv("MINIRAY_SHM", "0")  # as between hosts: every byte through the server
    with own_server(tmp_path, monkeypatch, "bigparts", proto_max_bulk_len="1mb") as srv:
        from miniray.broker import connect

        r = connect(srv.url)
        part = big_part_size(r)
        assert part < MB
        values = [_value(i, part) for i in range(3)]
        big = sum(v.nbytes for v in values[0].values() if v.nbytes >= bigvalues.MIN_BYTES)
        stored, read = bigvalues.stats["stored"], bigvalues.stats["read"]
        with miniray.Executor(redis_url=srv.url) as ex:
            out, back = ex.submit(big_tasks.transform, values[0]).result(timeout=90)
            _same(back, values[0])
            _same(out, big_tasks.transform(values[0])[0])
            assert bigvalues.stats["stored"] - stored == big  # the argument's, beside it
            assert bigvalues.stats["read"] - read == 2 * big  # the result's two, read back
            got = list(ex.map(big_tasks.transform, values[1:], chunksize=2, timeout=90))
            for (out, back), v in zip(got, values[1:]):
                _same(back, v)
                _same(out, big_tasks.transform(v)[0])
            assert ex.submit(tasks.square, 3).result(timeout=30) == 9
            # results are deleted as they are read; arguments once their chunk has ended
            wait_for(lambda: not _big_keys(r, "bigparts"), timeout=10,
                     what="no big values left on the server")
        r.close()


def _peak_above(fn):
    """``fn()``'s peak RSS above this process's RSS before it (VmHWM reset first)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = big_tasks._status("VmRSS")
    out = fn()
    return big_tasks._status("VmHWM") - base, out


def test_peak_memory_of_a_big_argument_and_result_through_the_server(tmp_path, monkeypatch):
    """A 64 MB argument sent and a 64 MB result received cost the client little more than
    the result (it was 3x: the reply parsed into bytes, then copied by unpickling), and the
    task process little more than the argument and its result (it was 4x)."""
    monkeypatch.setenv("MINIRAY_SHM", "0")
    n = 64 * MB
    with own_server(tmp_path, monkeypatch, "bigpeak") as srv:  # one worker, one slot
        with miniray.Executor(redis_url=srv.url) as ex:
            assert ex.submit(big_tasks.plus_one, np.zeros(4)).result(timeout=60)[0] == 1
            a = np.ones(n // 8)
            for _ in range(3):  # (the task process could be replaced: same pid wanted)
                pid, task_base = ex.submit(big_tasks.reset_peak).result(timeout=60)
                client, r = _peak_above(lambda: ex.submit(big_tasks.plus_one, a)
                                        .result(timeout=90))
                pid2, task_peak = ex.submit(big_tasks.peak).result(timeout=60)
                if pid2 == pid:
                    break
            assert r.nbytes == n and float(r[0]) == 2.0 and float(r[-1]) == 2.0
            assert client < 1.5 * n, f"client peak {client / n:.2f}x the value"
            assert pid2 == pid, "the task process changed between the measurements"
            task = task_peak - task_base
            assert task < 2.6 * n, f"task peak {task / n:.2f}x the value (argument + result)"


def test_a_big_argument_gone_from_the_server_fails_its_task_clearly(tmp_path, monkeypatch):
    """Its key deleted before a worker reads it: that task fails with an error that says
    what was missing, the executor goes on; a result's buffer gone fails its item alone."""
    monkeypatch.setenv("MINIRAY_SHM", "0")
    with own_server(tmp_path, monkeypatch, "biggone", workers=0) as srv:
        from miniray.broker import connect

        r = connect(srv.url)
        with miniray.Executor(redis_url=srv.url) as ex:
            f = ex.submit(tasks.array_sum, np.ones(MB))  # 8 MB
            wait_for(lambda: _big_keys(r, "biggone"), what="the argument on the server")
            r.execute("DEL", *_big_keys(r, "biggone"))
            worker = subprocess.Popen([sys.executable, "-m", "miniray.worker", "--name", "bg0"],
                                      env=worker_env(srv.url, "biggone"),
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            try:
                exc = f.exception(timeout=60)
                assert isinstance(exc, MinirayError), repr(exc)
                text = str(exc)
                assert "argument of 8.0 MiB could not be read" in text, text
                assert "it is gone" in text and "submit it again" in text, text
                assert ex.submit(tasks.array_sum, np.ones(MB)).result(timeout=60) == MB
            finally:
                worker.terminate()
                worker.wait(15)
        bigvalues.reading(srv.url)
        gone = bigvalues.fetch("biggone:big:nothing", 5 * MB, MB)
        assert type(gone) is _Failed, gone
        assert "buffer of 5.0 MiB could not be read" in str(gone.error), gone.error
        r.close()


def test_reading_a_big_value_from_a_server_that_stops_is_bounded(tmp_path):
    """A server that stops answering (SIGSTOP) while a big value is read: the read gives up
    after its stall bound, losing the connection (never a hang), and the next read, the
    server back, works; a part of another size than expected is refused, not written past."""
    import os
    import signal
    import time

    from miniray.resp import Connection, ConnectionLost
    from miniray.cluster.server import ServerProcess

    srv = ServerProcess(tcp=True)
    try:
        conn = Connection(srv.url)
        data = os.urandom(3 * MB + 5)
        conn.execute("HSET", "k", 0, data[:2 * MB], 1, data[2 * MB:])
        buf = bytearray(len(data))
        view = memoryview(buf)
        os.kill(srv.proc.pid, signal.SIGSTOP)
        try:
            t = time.monotonic()
            with pytest.raises(ConnectionLost, match="sent nothing for 2 s"):
                conn.fetch_into([("HGET", "k", 0)], [view[:2 * MB]], stall=2.0)
            assert time.monotonic() - t < 10
        finally:
            os.kill(srv.proc.pid, signal.SIGCONT)
        got = conn.fetch_into([("HGET", "k", 0), ("HGET", "k", 1), ("HGET", "k", 9)],
                              [view[:2 * MB], view[2 * MB:], view[:5]])
        assert got[:2] == [None, None] and isinstance(got[2], ValueError), got  # (9: nil)
        assert bytes(buf) == data
        with pytest.raises(ConnectionLost, match="where 5 were expected"):
            conn.fetch_into([("HGET", "k", 1)], [view[:5]])
        assert conn.execute("PING") == b"PONG"  # (connected afresh: the old one was out of step)
    finally:
        srv.close()
