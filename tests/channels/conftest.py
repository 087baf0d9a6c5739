"""Fixtures for the channel tests: a real WorkerServer process and a real sshd on loopback."""

import getpass
import os
import shutil
import socket
import subprocess
import sys
import time

import pytest
from chanhelpers import PYTHONPATH

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """``python -m miniray.channels.server`` in a subprocess, with its address and pid."""

    def __init__(self, work_fn, secret_file=None, extra=()):
        cmd = [sys.executable, "-m", "miniray.channels.server", "--host", "127.0.0.1",
               "--port", "0", "--work-fn", work_fn, *extra]
        if secret_file:
            cmd += ["--secret-file", str(secret_file)]
        env = dict(os.environ, PYTHONPATH=PYTHONPATH)
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env)
        line = self.proc.stdout.readline()
        if not line.startswith("MINIRAY_SERVE_LISTENING"):
            self.proc.kill()
            raise RuntimeError(f"server did not start: {line!r} {self.proc.stderr.read()}")
        _, self.host, port, pid = line.split()
        self.port, self.pid = int(port), int(pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        self.proc.stderr.close()


@pytest.fixture
def start_server():
    """Factory: ``start_server("workfns.echo", secret_file=None) -> ServerProcess``."""
    servers = []

    def start(work_fn, secret_file=None, extra=()):
        servers.append(ServerProcess(work_fn, secret_file, extra))
        return servers[-1]

    yield start
    for s in servers:
        s.stop()


class Sshd:
    def __init__(self, root, port, client_key, other_key, host_pub):
        self.root, self.port = root, port
        self.client_key, self.other_key, self.host_pub = client_key, other_key, host_pub


def _keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    """A real OpenSSH server on 127.0.0.1:<free port> accepting one generated client key."""
    if not os.path.exists(SSHD):
        pytest.skip("sshd is not installed (apt-get install -y openssh-server)")
    if not shutil.which("ssh-keygen"):
        pytest.skip("ssh-keygen is not installed (apt-get install -y openssh-client)")
    pytest.importorskip("paramiko", reason="SSH tests need paramiko (pip install paramiko)")
    root = tmp_path_factory.mktemp("sshd")
    for name in ("host_key", "client_key", "other_key"):
        _keygen(root / name)
    (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
    port = _free_port()
    config = root / "sshd_config"
    config.write_text(f"""\
Port {port}
ListenAddress 127.0.0.1
HostKey {root / 'host_key'}
AuthorizedKeysFile {root / 'authorized_keys'}
PidFile {root / 'sshd.pid'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin yes
""")
    try:
        os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege separation folder
    except OSError as e:
        pytest.skip(f"sshd needs /run/sshd, which cannot be made here ({e}): run the tests "
                    "as root, or make it once: sudo mkdir -p /run/sshd")
    log = open(root / "sshd.log", "w")
    proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)], stdout=subprocess.DEVNULL,
                            stderr=log)
    log.close()  # the child has its own copy
    deadline = time.monotonic() + 15
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.skip(f"sshd did not start: {(root / 'sshd.log').read_text()[-500:]}")
            time.sleep(0.05)
    host_pub = (root / "host_key.pub").read_text().split()
    yield Sshd(root, port, root / "client_key", root / "other_key", host_pub)
    proc.terminate()
    proc.wait(10)


@pytest.fixture
def ssh_home(sshd, tmp_path, monkeypatch):
    """A HOME whose ~/.ssh/config names the sshd ``testnode`` and whose known_hosts has its key.

    Exercises the OpenSSH-compatible lookup for real: host alias, Port, User, IdentityFile.
    """
    dot = tmp_path / ".ssh"
    dot.mkdir()
    (dot / "config").write_text(  # two aliases: two "hosts" for multi-node clusters
        f"Host testnode testnode2\n  HostName 127.0.0.1\n  Port {sshd.port}\n"
        f"  User {getpass.getuser()}\n  IdentityFile {sshd.client_key}\n")
    (dot / "known_hosts").write_text(f"[127.0.0.1]:{sshd.port} {sshd.host_pub[0]} "
                                     f"{sshd.host_pub[1]}\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)  # only the configured key may log in
    return tmp_path
