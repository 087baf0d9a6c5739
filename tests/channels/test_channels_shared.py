"""SharedBuffer: one piece of memory seen by parent and workers, no copies."""

import pytest
import workfns

from miniray.channels import SharedBuffer, Worker

np = pytest.importorskip("numpy")
pytestmark = pytest.mark.timeout(30)


def test_forked_worker_shares_memory_both_ways():
    with SharedBuffer(8 * 16) as buf:
        a = buf.ndarray((16,), "int64")
        a[:] = 0

        def child(h):
            h.recv()  # wait for the parent's write, made after the fork
            h.send(int(a[3]))
            a[5] = 55
            h.send("written")

        with Worker(child) as w:
            a[3] = 33
            w.send("go")
            assert w.recv(timeout=10) == 33  # parent's post-fork write seen: no copy-on-write
            assert w.recv(timeout=10) == "written"
            assert a[5] == 55  # and the child's write is seen by the parent


def test_pickled_buffer_is_a_reference_not_a_copy():
    n = 1_000_000
    with SharedBuffer(8 * n) as buf:
        a = buf.ndarray((n,), "int64")
        a[:] = 7
        with Worker(workfns.shared_add, codec="pickle", max_size=64 * 1024) as w:
            w.send((buf, n))  # 8 MB of data through a 64 KiB frame cap: only a reference travels
            assert w.recv(timeout=10) == 8
            assert int(a.sum()) == 8 * n
            w.send("done")


def test_same_host_remote_worker_maps_the_buffer(start_server):
    from miniray.channels import RemoteWorker

    server = start_server("workfns.shared_add")
    with SharedBuffer(8 * 4) as buf:
        a = buf.ndarray((4,), "int64")
        a[:] = [1, 2, 3, 4]
        with RemoteWorker(server.host, server.port, codec="pickle") as w:
            w.send((buf, 4))
            assert w.recv(timeout=10) == 2
            assert a.tolist() == [2, 3, 4, 5]
            w.send("done")


def test_views_share_the_same_memory():
    with SharedBuffer(64) as buf:
        x = buf.ndarray((8,), "float64")
        y = buf.ndarray((8,), "float64")
        assert x.ctypes.data == y.ctypes.data
        x[0] = 1.5
        assert y[0] == 1.5 and bytes(buf.buffer[:8]) == x[:1].tobytes()


def test_invalid_size():
    with pytest.raises(ValueError, match="must be positive"):
        SharedBuffer(0)
