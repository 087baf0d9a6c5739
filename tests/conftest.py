"""Fixtures: a real server (valkey/redis), real worker processes, no fakes."""

import atexit
import os
import shutil
import tempfile

import pytest

from support import Cluster

# a persistent local cluster the developer runs (``miniray up --detach``) must not serve the
# tests' notebooks, whose default would find it (tests of it set a directory of their own)
os.environ["MINIRAY_CLUSTER_DIR"] = tempfile.mkdtemp(prefix="miniray-test-clusters-")
atexit.register(shutil.rmtree, os.environ["MINIRAY_CLUSTER_DIR"], True)


@pytest.fixture(scope="session")
def server():
    """A private Redis-compatible server on 127.0.0.1 with a password, for the session."""
    from miniray.cluster.server import ServerProcess

    srv = ServerProcess(tcp=True)
    yield srv
    srv.close()


@pytest.fixture
def cluster(server, monkeypatch, tmp_path):
    c = Cluster(server, monkeypatch, tmp_path)
    yield c
    c.stop()


@pytest.fixture
def one_worker(cluster):
    """The cluster with one worker, "solo", of one slot."""
    cluster.start_worker(name="solo")
    return cluster


@pytest.fixture
def two_workers(cluster):
    cluster.start_worker(name="w0", wait=False)
    cluster.start_worker(name="w1", wait=False)
    cluster.wait_workers(2)
    return cluster


# SSH hosts: an sshd on 127.0.0.1 and two in network namespaces (tests/netns.py), one lab per
# test module; `home` points ssh at the lab's keys and config.
@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    pytest.importorskip("paramiko", reason="SSH support needs paramiko (pip install paramiko)")
    from netns import SSHLab, unavailable

    reason = unavailable()
    if reason:
        pytest.skip(f"SSH hosts in network namespaces unavailable: {reason}")
    lab = SSHLab(tmp_path_factory.mktemp("sshlab"))
    yield lab
    lab.close()


@pytest.fixture
def home(lab, monkeypatch):
    monkeypatch.setenv("HOME", str(lab.home))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # only the configured keys log in
    monkeypatch.delenv("MINIRAY_REDIS_URL", raising=False)
    return lab.home
