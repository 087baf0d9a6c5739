"""What a task takes and returns, at the edges: a value the client cannot unpickle fails only
its own item (a class only the worker has, a ``__reduce__`` that raises here, an exception of
a worker-only class), and values bigger than the server takes in one piece (its
``proto-max-bulk-len``) travel in parts; ones it cannot hold at all (``maxmemory``) fail at
``submit`` with the sizes named, and the executor goes on."""

import os
import textwrap
from contextlib import contextmanager

import numpy as np
import pytest

import miniray
import tasks
from miniray import protocol
from miniray.errors import PayloadTooLargeError, SerializationError
from support import ROOT, TESTS, own_server, wait_for

pytestmark = pytest.mark.timeout(180)

_MODULE = "miniray_worker_only_values"


def _worker_only_env(tmp_path):
    """A module on the worker's PYTHONPATH only, and a flag only the worker's env has."""
    mod_dir = tmp_path / "worker_only"
    mod_dir.mkdir()
    (mod_dir / f"{_MODULE}.py").write_text(textwrap.dedent("""
        class WorkerOnlyThing:
            def __init__(self, x):
                self.x = x

        class WorkerOnlyError(Exception):
            pass
    """))
    return {"PYTHONPATH": os.pathsep.join([str(mod_dir), TESTS, ROOT]),
            "MINIRAY_TEST_WORKER_MODULE": _MODULE, "MINIRAY_TEST_WORKER_SIDE": "1"}


@pytest.fixture
def worker_only(cluster, tmp_path):
    """One worker whose tasks can make values this process cannot unpickle."""
    with pytest.raises(ImportError):
        __import__(_MODULE)
    cluster.start_worker(name="wo", extra_env=_worker_only_env(tmp_path))
    return cluster


def _check_item_error(exc, item, task, what):
    assert isinstance(exc, SerializationError), repr(exc)
    text = str(exc)
    assert f"item {item} (task {task})" in text, text
    assert what in text, text
    assert "Is its type importable here?" in text


def test_a_value_the_client_cannot_unpickle_fails_only_its_item(worker_only):
    with worker_only.executor() as ex:
        futures = ex.map_futures(
            lambda x: tasks.mixed_values(x, worker_class_at=(3,), bad_reduce_at=(5,),
                                         worker_error_at=(6,), nested_at=(1,)),
            range(8), chunksize=8)
        for i, f in enumerate(futures):
            exc = f.exception(timeout=60)
            if i in (1, 3):  # (1: inside a dict of lists)
                _check_item_error(exc, i, i, f"No module named '{_MODULE}'")
            elif i == 5:
                _check_item_error(exc, 5, 5, "can only be rebuilt where the worker runs")
            elif i == 6:  # the task's own exception: its traceback still comes along
                _check_item_error(exc, 6, 6, f"No module named '{_MODULE}'")
                assert "WorkerOnlyError" in str(exc.__cause__)
            else:
                assert exc is None and f.result() == i * 10
        wait_for(lambda: not ex._refs, what="nothing pending")
        assert ex.submit(tasks.square, 4).result(timeout=60) == 16  # it goes on


def test_a_bad_value_spares_the_chunks_that_share_its_message(worker_only, monkeypatch):
    """A task process sends the outcomes of the chunks it finished in one message; a bad
    value in one chunk leaves the others in that message delivered."""
    import miniray.client.delivery as delivery_module

    shared = []  # chunk ids of messages that carried more than one chunk
    real = delivery_module.decode_message

    def recording(msg):
        decoded = real(msg)
        if isinstance(decoded, tuple) and len(decoded[0].chunks) > 1:
            shared.extend(chunk for chunk, _ in decoded[0].chunks)
        return decoded

    monkeypatch.setattr(delivery_module, "decode_message", recording)
    bad = set(range(1, 1200, 40))  # the second item of every 20th chunk
    with worker_only.executor() as ex:
        futures = ex.map_futures(lambda x: tasks.mixed_values(x, bad_reduce_at=bad),
                                 range(1200), chunksize=2)
        for i, f in enumerate(futures):
            exc = f.exception(timeout=90)
            if i in bad:
                _check_item_error(exc, 1, i, "can only be rebuilt where the worker runs")
            else:
                assert exc is None and f.result() == i * 10, (i, exc)
        wait_for(lambda: not ex._refs, what="nothing pending")
    # the chunks are numbered in submit order, from 0: the bad ones shared a message
    assert {i // 2 for i in bad} & set(shared), "no bad value shared a message with others"


def test_a_submit_whose_value_cannot_be_unpickled_fails_alone(worker_only):
    with worker_only.executor() as ex:
        good = [ex.submit(tasks.mixed_values, i) for i in range(3)]
        a = ex.submit(tasks.mixed_values, 7, worker_class_at=(7,))
        b = ex.submit(tasks.mixed_values, 8, bad_reduce_at=(8,))
        c = ex.submit(tasks.mixed_values, 9, worker_error_at=(9,))
        _check_item_error(a.exception(timeout=60), 0, a.task_id, "No module named")
        _check_item_error(b.exception(timeout=60), 0, b.task_id, "can only be rebuilt")
        _check_item_error(c.exception(timeout=60), 0, c.task_id, "No module named")
        assert [f.result(timeout=60) for f in good] == [0, 10, 20]
        wait_for(lambda: not ex._refs, what="nothing pending")
        assert ex.submit(tasks.square, 5).result(timeout=60) == 25


# -- huge values --------------------------------------------------------------------------------
MB = 1024 * 1024


@contextmanager
def _small_server(tmp_path, monkeypatch, ns, **config):
    """A server of the test's own with ``config`` set (see ``support.own_server``), one
    worker on it, and a connection to it."""
    from miniray.broker import connect

    with own_server(tmp_path, monkeypatch, ns, **config) as srv:
        r = connect(srv.url)
        try:
            yield srv, r
        finally:
            r.close()


def test_values_over_the_servers_bulk_limit_travel_in_parts(tmp_path, monkeypatch):
    """With proto-max-bulk-len at its minimum (1 MB), 5 MB arguments and results (bytes and
    a numpy array, in a submit and in a map) arrive intact."""
    with _small_server(tmp_path, monkeypatch, "bulk", proto_max_bulk_len="1mb") as (srv, r):
        assert r.execute("CONFIG", "GET", "proto-max-bulk-len")[1] == str(MB).encode()
        data = os.urandom(5 * MB)
        arr = np.random.default_rng(0).random(5 * MB // 8 + 3)
        with miniray.Executor(redis_url=srv.url) as ex:
            assert ex.submit(tasks.echo_bytes, data).result(timeout=120) == data
            assert ex.submit(tasks.make_bytes, 5 * MB).result(timeout=120) == b"r" * (5 * MB)
            back = ex.submit(tasks.identity, arr).result(timeout=120)
            assert back.dtype == arr.dtype and np.array_equal(back, arr)
            assert ex.submit(tasks.array_sum, arr).result(timeout=120) == pytest.approx(
                float(arr.sum()))
            got = list(ex.map(tasks.echo_bytes, [data[:3 * MB], data[2 * MB:]], chunksize=2,
                              timeout=120))
            assert got == [data[:3 * MB], data[2 * MB:]]
            assert ex.submit(tasks.square, 3).result(timeout=60) == 9


def test_values_the_server_cannot_hold_fail_clearly(tmp_path, monkeypatch):
    """Over the server's maxmemory: the submit raises, naming the size and the limit; a result
    fails its future the same way; the executor stays usable."""
    monkeypatch.setenv("MINIRAY_SHM", "0")  # (results from this machine: via the server too)
    with _small_server(tmp_path, monkeypatch, "maxmem") as (srv, r):
        with miniray.Executor(redis_url=srv.url) as ex:
            assert ex.submit(tasks.square, 2).result(timeout=60) == 4
            used = int(dict(line.split(":", 1) for line in r.execute("INFO", "memory")
                            .decode().splitlines() if ":" in line)["used_memory"])
            r.execute("CONFIG", "SET", "maxmemory", used + 3 * MB)
            with pytest.raises(PayloadTooLargeError) as info:
                ex.submit(tasks.echo_bytes, b"x" * (5 * MB))
            text = str(info.value)
            assert "5.0 MiB" in text and "maxmemory" in text, text
            assert ex.submit(tasks.square, 3).result(timeout=60) == 9
            # a result it cannot hold fails its future, promptly; the task is not run again
            exc = ex.submit(tasks.make_bytes, 5 * MB).exception(timeout=60)
            assert isinstance(exc, PayloadTooLargeError), repr(exc)
            assert "5.0 MiB" in str(exc) and "maxmemory" in str(exc), str(exc)
            # so does an array that would travel beside its message (miniray.values.bigvalues): it
            # is not stored first (a write that starts under maxmemory goes through, however
            # big, and would leave the server too full for the next submit)
            exc = ex.submit(tasks.make_array, 5 * MB // 8).exception(timeout=60)
            assert isinstance(exc, PayloadTooLargeError), repr(exc)
            assert "5.0 MiB" in str(exc) and "maxmemory" in str(exc), str(exc)
            assert r.execute("KEYS", "maxmem:big:*") == []
            assert list(ex.map(tasks.square, range(5), timeout=60)) == [0, 1, 4, 9, 16]


def test_an_old_result_message_fails_its_items_with_a_clear_error():
    """A result in another protocol version is not guessed at: its items fail, saying so."""
    header = protocol.ResultHeader("w", "hostx", 1, [(0, True)])
    msg = protocol.encode_result(header, protocol.encode_batches([((0, 1), [1], {})]))[0]
    old = b"R" + bytes([9]) + msg[2:]
    got_header, err = protocol.decode_message(old)
    assert got_header.host == "hostx" and "protocol 9" in str(err)


@pytest.mark.timeout(300)
def test_an_argument_over_a_gigabyte_works_on_a_default_server(tmp_path, monkeypatch):
    """1.1 GB on a server with Redis's defaults (proto-max-bulk-len 512 MB,
    client-query-buffer-limit 1 GB): it travels in parts, each stored by a command of its own
    (one transaction holding them all passed the query buffer limit: the server closed the
    connection and the executor broke)."""
    with _small_server(tmp_path, monkeypatch, "gigabyte", proto_max_bulk_len="512mb",
                       client_query_buffer_limit="1gb") as (srv, r):
        arr = np.ones(int(1.1 * 2**30), dtype=np.uint8)
        with miniray.Executor(redis_url=srv.url) as ex:
            assert ex.submit(tasks.array_sum, arr).result(timeout=240) == arr.size
            del arr
            assert ex.submit(tasks.square, 3).result(timeout=60) == 9


def test_results_the_user_dropped_are_freed_although_nothing_was_submitted_since(cluster):
    """The executor keeps nothing of a result once its future is dropped: not even for the
    last batch of submits (the thread that sent them held that batch, and with it the
    futures and their values, until the next submit)."""
    import gc
    import weakref

    cluster.start_worker("--slots", "2", name="w0")
    with cluster.executor() as ex:
        futures = [ex.submit(tasks.make_array, 1000) for _ in range(20)]
        alive = [weakref.ref(f.result(timeout=60)) for f in futures]
        del futures
        gc.collect()
        assert [r for r in alive if r() is not None] == []
