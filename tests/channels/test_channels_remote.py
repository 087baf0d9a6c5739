"""RemoteWorker against a real WorkerServer process on 127.0.0.1: data, auth, liveness."""

import socket
import struct

import pytest
from chanhelpers import wait_gone

from miniray.channels import (AuthenticationError, RemoteWorker, WorkerDiedError, WorkerServer)

pytestmark = pytest.mark.timeout(60)
SECRET = "correct horse battery staple"


@pytest.fixture
def secret_file(tmp_path):
    path = tmp_path / "secret"
    path.write_text(SECRET + "\n")
    return path


@pytest.mark.parametrize("codec", ["json", "marshal", "pickle"])
def test_round_trip(start_server, codec):
    server = start_server("workfns.echo")
    with RemoteWorker(server.host, server.port, codec=codec, timeout=10) as w:
        for msg in ([1, 2], {"a": "b"}, "x" * 100_000):
            w.send(msg)
            assert w.recv(timeout=10) == msg
        assert w.ping(timeout=10) > 0


def test_each_connection_gets_its_own_worker_with_env(start_server):
    server = start_server("workfns.report")
    a = RemoteWorker(server.host, server.port, env={"EXTRA": "a"})
    b = RemoteWorker(server.host, server.port, env={"EXTRA": "b"})
    try:
        ra, rb = a.recv(timeout=10), b.recv(timeout=10)
        assert ra["pid"] != rb["pid"] != server.pid
        assert (ra["extra"], rb["extra"]) == ("a", "b")
        assert a.pid == ra["pid"]
    finally:
        a.close()
        b.close()


def test_secret_handshake(start_server, secret_file):
    server = start_server("workfns.echo", secret_file=secret_file)
    with RemoteWorker(server.host, server.port, secret=SECRET) as w:
        w.send("authenticated")
        assert w.recv(timeout=10) == "authenticated"


def test_wrong_secret_is_refused(start_server, secret_file):
    server = start_server("workfns.echo", secret_file=secret_file)
    with pytest.raises(AuthenticationError, match="refused the connection: authentication"):
        RemoteWorker(server.host, server.port, secret="wrong")
    with pytest.raises(AuthenticationError, match="requires a shared secret"):
        RemoteWorker(server.host, server.port)


def test_client_with_secret_refuses_unauthenticated_server(start_server):
    server = start_server("workfns.echo")
    with pytest.raises(AuthenticationError, match="unauthenticated server"):
        RemoteWorker(server.host, server.port, secret=SECRET)


def test_stray_connection_cannot_run_code_and_server_survives(start_server, secret_file):
    server = start_server("workfns.echo", secret_file=secret_file)
    with socket.create_connection((server.host, server.port), timeout=10) as s:
        s.recv(4096)  # the challenge
        s.sendall(struct.pack("!BQ", 0, 1 << 40))  # a forged, huge frame
        s.settimeout(10)
        while s.recv(4096):
            pass  # the server closes the connection
    with RemoteWorker(server.host, server.port, secret=SECRET) as w:
        w.send("still serving")
        assert w.recv(timeout=10) == "still serving"


def test_no_unauthenticated_listener_on_non_loopback():
    with pytest.raises(ValueError, match="refusing to listen on non-loopback"):
        WorkerServer("0.0.0.0", 0, work_fn="workfns.echo")


def test_secret_never_in_repr():
    server = WorkerServer("127.0.0.1", 0, work_fn="workfns.echo", secret=SECRET)
    try:
        assert SECRET not in repr(server) and "auth=on" in repr(server)
    finally:
        server._listener.close()


def test_bad_work_fn_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot load work_fn 'workfns.nope'"):
        WorkerServer("127.0.0.1", 0, work_fn="workfns.nope")


def test_remote_worker_exit_is_seen(start_server):
    server = start_server("workfns.exit_with")
    w = RemoteWorker(server.host, server.port)
    assert w.is_alive()
    w.send(0)
    with pytest.raises(WorkerDiedError, match="is gone"):
        w.recv(timeout=10)
    assert not w.is_alive()


def test_kill_ends_a_busy_remote_worker(start_server):
    server = start_server("workfns.sleep_forever")
    w = RemoteWorker(server.host, server.port)
    pid = w.recv(timeout=10)
    assert not wait_gone(pid, timeout=0.2)
    w.kill()
    assert wait_gone(pid, timeout=10), "the server did not kill the worker of a closed client"


def test_wait_returns_when_remote_exits_keeping_messages(start_server):
    server = start_server("workfns.send_then_exit")
    with RemoteWorker(server.host, server.port) as w:
        w.wait(timeout=10)
        assert w.exitcode == -1 and not w.is_alive()
        assert w.recv(timeout=1) == "last words"


def test_server_stops_and_takes_workers_with_it(start_server):
    server = start_server("workfns.sleep_forever")
    w = RemoteWorker(server.host, server.port)
    pid = w.recv(timeout=10)
    server.stop()
    assert wait_gone(pid, timeout=10)
    with pytest.raises(WorkerDiedError):
        w.recv(timeout=10)
