"""The public surface of miniray.channels, and the ``miniray serve`` entry points."""

import os
import subprocess
import sys

import pytest
from chanhelpers import PYTHONPATH

import miniray.channels

pytestmark = pytest.mark.timeout(30)


def test_all_matches_public_surface():
    public = {n for n in dir(miniray.channels) if not n.startswith("_")}
    modules = {"actors", "cluster", "errors", "framing", "handshake", "nccl", "remote", "server",
               "shared", "worker"}
    assert set(miniray.channels.__all__) == (public - modules) | {"WorkerServer"}
    for name in miniray.channels.__all__:
        assert getattr(miniray.channels, name) is not None


@pytest.mark.parametrize("module", ["miniray.channels.server", "miniray.channels"])
def test_python_m_entry_points(module, tmp_path):
    proc = subprocess.Popen([sys.executable, "-W", "error", "-m", module, "--work-fn",
                             "workfns.echo"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=dict(os.environ, PYTHONPATH=PYTHONPATH))
    try:
        line = proc.stdout.readline()
        assert line.startswith("MINIRAY_SERVE_LISTENING 127.0.0.1 "), proc.stderr.read()
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        proc.stdout.close()
        proc.stderr.close()


def test_serve_refuses_public_address_without_secret():
    from miniray.channels.server import main

    assert main(["--host", "0.0.0.0", "--work-fn", "workfns.echo"]) == 2
