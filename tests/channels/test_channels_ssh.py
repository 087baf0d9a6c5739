"""miniray.cluster.ssh.connect and Cluster against a real sshd on 127.0.0.1."""

import sys

import pytest
from chanhelpers import PYTHONPATH, wait_gone

from miniray.cluster.ssh import connect as ssh
from miniray.channels import Cluster, NodeConfig

pytestmark = pytest.mark.timeout(90)


def test_connect_honours_ssh_config(ssh_home):
    client = ssh.connect("testnode")
    try:
        status, out = ssh.run(client, "echo connected")
        assert (status, out.strip()) == (0, "connected")
    finally:
        client.close()


def test_auth_failure_is_its_own_error(ssh_home, sshd):
    with pytest.raises(ssh.SSHAuthError, match="authentication to .*127.0.0.1.* failed") as info:
        ssh.connect("127.0.0.1", port=sshd.port, key_filename=str(sshd.other_key),
                    config_path=None, known_hosts=str(ssh_home / ".ssh" / "known_hosts"))
    assert info.value.host == "127.0.0.1" or "127.0.0.1" in str(info.value)


def test_unknown_host_key_is_its_own_error(ssh_home, sshd):
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    with pytest.raises(ssh.SSHHostKeyError, match="testnode.*not in known_hosts"):
        ssh.connect("testnode")


def test_unreachable_host_is_its_own_error(ssh_home):
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(ssh.SSHUnreachableError, match="cannot reach SSH server .*127.0.0.1"):
        ssh.connect("127.0.0.1", port=port, config_path=None, timeout=5)


def test_pty_command_dies_when_connection_drops(ssh_home):
    client = ssh.connect("testnode")
    cmd = ssh.RemoteCommand(client, "echo $$; exec sleep 300", pty=True)
    pid = int(cmd.readline(timeout=10))
    assert not wait_gone(pid, timeout=0.2)
    client.close()  # no kill sent: only the hang-up can end it
    assert wait_gone(pid, timeout=10), "remote command outlived its SSH connection"


def _nodes(host="testnode", **kw):
    return [NodeConfig(host, python=sys.executable, env={"PYTHONPATH": PYTHONPATH}, **kw)]


def test_cluster_starts_workers_and_stop_leaves_nothing(ssh_home):
    cluster = Cluster(_nodes(num_workers=2, gpus=[0, 1]) + _nodes("testnode2"))
    workers = cluster.start("workfns.report")
    try:
        assert len(workers) == 3
        reports = [w.recv(timeout=30) for w in workers]
        assert [r["cvd"] for r in reports] == ["0", "1", None]
        assert [r["rank"] for r in reports] == ["0", "1", "0"]
        for w in workers:
            w.send({"hello": "cluster"})
            assert w.recv(timeout=10) == {"hello": "cluster"}
        server_pids = cluster.server_pids()
        assert sorted(server_pids) == ["testnode", "testnode2"]
    finally:
        cluster.stop()
    for pid in list(server_pids.values()) + [r["pid"] for r in reports]:
        assert wait_gone(pid, timeout=10), f"pid {pid} still running after Cluster.stop()"
    assert cluster.workers == []


def test_actors_on_cluster_workers(ssh_home):
    from workfns import Counter

    from miniray.channels.actors import ActorPool, actor

    with Cluster(_nodes(num_workers=2)) as cluster:
        workers = cluster.start("miniray.channels.actors.actor_main")
        handles = [actor(Counter, where=w) for w in workers]
        pool = ActorPool(handles)
        assert sum(pool.map(lambda a, x: a.add(x), range(10))) > 0
        assert len({h.pid().result(timeout=10) for h in handles}) == 2
        for h in handles:
            h.close()


def test_cluster_reports_a_server_that_cannot_start(ssh_home):
    cluster = Cluster(_nodes(), start_timeout=30)
    with pytest.raises(Exception, match="(?s)did not start on testnode.*cannot load work_fn"):
        cluster.start("workfns.no_such_function")
    assert cluster.workers == []


def test_cluster_surfaces_ssh_errors_by_host(ssh_home):
    (ssh_home / ".ssh" / "known_hosts").write_text("")
    with pytest.raises(ssh.SSHHostKeyError, match="testnode"):
        Cluster(_nodes()).start("workfns.echo")
