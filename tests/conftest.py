"""Fixtures: a real server (valkey/redis), real worker processes, no fakes."""

import pytest

from support import Cluster


@pytest.fixture(scope="session")
def server():
    """A private Redis-compatible server on 127.0.0.1 with a password, for the session."""
    from miniray.server import ServerProcess

    srv = ServerProcess(tcp=True)
    yield srv
    srv.close()


@pytest.fixture
def cluster(server, monkeypatch, tmp_path):
    c = Cluster(server, monkeypatch, tmp_path)
    yield c
    c.stop()


@pytest.fixture
def two_workers(cluster):
    cluster.start_worker(name="w0", wait=False)
    cluster.start_worker(name="w1", wait=False)
    cluster.wait_workers(2)
    return cluster
