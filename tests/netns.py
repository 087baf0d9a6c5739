"""Real SSH "hosts" for tests: OpenSSH servers on 127.0.0.1 and in network namespaces.

Each namespace host has its own address on a bridge in the root namespace, ``lo`` up (the
reverse tunnel listens there), and its own sshd on port 22. ``SSHLab`` makes the keys, the
sshds, a HOME whose ~/.ssh/config and known_hosts name them, and removes everything
(processes in the namespaces, namespaces, bridge) on ``close()`` even after a failure.
Needs root, ``ip`` (iproute2) and ``sshd`` (openssh-server).
"""

import getpass
import os
import shutil
import signal
import socket
import subprocess
import time

import psutil

SSHD = shutil.which("sshd") or "/usr/sbin/sshd"


def unavailable():
    """Why namespace hosts cannot be made here (None when they can)."""
    if not os.path.exists(SSHD):
        return "sshd is not installed (apt-get install -y openssh-server)"
    if not shutil.which("ssh-keygen"):
        return "ssh-keygen is not installed (apt-get install -y openssh-client)"
    if not shutil.which("ip"):
        return "`ip` is not installed (apt-get install -y iproute2)"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs the tests as root)"
    probe = f"mrprobe{os.getpid() % 100000}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` does not work here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def reap_stale():
    """Remove namespaces, bridges and veths left by an earlier run that was killed (tag = its
    pid). A tag equal to our own pid is stale too: a dead run had this pid before us."""
    import re

    names = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    for tag in set(re.findall(r"\bmr(\d+)(?:h\d+|br|v\d+)\b", names + links)):
        if int(tag) != os.getpid() and psutil.pid_exists(int(tag)):
            continue
        for ns in re.findall(rf"\b(mr{tag}h\d+)\b", names):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True,
                                      text=True).stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except OSError:
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        for link in set(re.findall(rf"\b(mr{tag}(?:br|v\d+))\b", links)):
            subprocess.run(["ip", "link", "del", link], capture_output=True)


def _sh(*cmd):
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: {r.stderr.strip()}")
    return r.stdout


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _keygen(path):
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)


def _wait_port(address, port, proc, log, timeout=15):
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((address, port), timeout=1).close()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"sshd on {address}:{port} did not start: "
                                   f"{open(log).read()[-500:]}") from None
            time.sleep(0.05)


class SSHLab:
    """``hosts``: alias -> (address, port, netns or None). ``home``: a HOME for paramiko."""

    def __init__(self, root, n_netns=2):
        self.root = root
        reap_stale()
        self.tag = f"mr{os.getpid()}"
        self.bridge = f"{self.tag}br"
        self.subnet = f"10.{200 + os.getpid() % 50}.{(os.getpid() // 50) % 250}"
        if len(self.bridge) > 15:  # IFNAMSIZ
            raise RuntimeError(f"pid {os.getpid()} too long for interface names")
        self.namespaces, self.procs, self.hosts = [], {}, {}
        self.user = getpass.getuser()
        for name in ("host_key", "client_key", "other_key"):
            _keygen(root / name)
        (root / "authorized_keys").write_text((root / "client_key.pub").read_text())
        self.host_pub = " ".join((root / "host_key.pub").read_text().split()[:2])
        os.makedirs("/run/sshd", exist_ok=True)
        try:
            self._start_sshd("loop", "127.0.0.1", _free_port(), None)
            if n_netns:
                _sh("ip", "link", "add", self.bridge, "type", "bridge")
                _sh("ip", "addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
                _sh("ip", "link", "set", self.bridge, "up")
            for i in range(1, n_netns + 1):
                ns, veth = f"{self.tag}h{i}", f"{self.tag}v{i}"
                _sh("ip", "netns", "add", ns)
                self.namespaces.append(ns)
                _sh("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0",
                    "netns", ns)
                _sh("ip", "link", "set", veth, "master", self.bridge, "up")
                _sh("ip", "-n", ns, "addr", "add", f"{self.subnet}.{10 + i}/24", "dev", "eth0")
                _sh("ip", "-n", ns, "link", "set", "eth0", "up")
                _sh("ip", "-n", ns, "link", "set", "lo", "up")
                self._start_sshd(f"h{i}", f"{self.subnet}.{10 + i}", 22, ns)
            self.home = root / "home"
            self.write_home(self.home)
        except BaseException:
            self.close()
            raise

    def _start_sshd(self, alias, address, port, ns):
        config = self.root / f"sshd_{alias}.conf"
        # h2 has no sftp subsystem (hardened hosts exist): files reach it through `cat`
        sftp = "" if alias == "h2" else "Subsystem sftp internal-sftp\n"
        config.write_text(f"""\
Port {port}
ListenAddress {address}
HostKey {self.root / 'host_key'}
AuthorizedKeysFile {self.root / 'authorized_keys'}
PidFile {self.root / f'sshd_{alias}.pid'}
StrictModes no
UsePAM no
PasswordAuthentication no
KbdInteractiveAuthentication no
PubkeyAuthentication yes
PermitRootLogin yes
AllowTcpForwarding yes
{sftp}""")
        log = self.root / f"sshd_{alias}.log"
        cmd = [SSHD, "-D", "-e", "-f", str(config)]
        if ns:
            cmd = ["ip", "netns", "exec", ns] + cmd  # ip execs sshd: same pid
        with open(log, "w") as f:
            proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=f)
        self.procs[alias] = proc
        self.hosts[alias] = (address, port, ns)
        _wait_port(address, port, proc, log)

    def write_home(self, home, known=None):
        """A HOME whose ~/.ssh names every host (``known``: aliases in known_hosts)."""
        dot = home / ".ssh"
        dot.mkdir(parents=True, exist_ok=True)
        cfg, kh = [], []
        for alias, (address, port, _) in self.hosts.items():
            cfg.append(f"Host {alias}\n  HostName {address}\n  Port {port}\n  User {self.user}\n"
                       f"  IdentityFile {self.root / 'client_key'}\n")
            if known is None or alias in known:
                kh.append(f"[{address}]:{port} {self.host_pub}" if port != 22
                          else f"{address} {self.host_pub}")
        loop_port = self.hosts["loop"][1]
        cfg.append(f"Host badkey\n  HostName 127.0.0.1\n  Port {loop_port}\n  User {self.user}\n"
                   f"  IdentityFile {self.root / 'other_key'}\n")
        # same server, but reached as "localhost": its key is not recorded under that name
        cfg.append(f"Host stranger\n  HostName localhost\n  Port {loop_port}\n"
                   f"  User {self.user}\n  IdentityFile {self.root / 'client_key'}\n")
        cfg.append(f"Host nobody\n  HostName 127.0.0.1\n  Port {_free_port()}\n"
                   f"  User {self.user}\n")
        (dot / "config").write_text("\n".join(cfg))
        (dot / "known_hosts").write_text("\n".join(kh) + "\n")
        return home

    # -- inspection --------------------------------------------------------------------------
    def netns_id(self, alias):
        """``net:[inode]`` of a host, as ``os.readlink('/proc/self/ns/net')`` shows it there."""
        ns = self.hosts[alias][2]
        if ns is None:
            return os.readlink("/proc/self/ns/net")
        return f"net:[{os.stat(f'/run/netns/{ns}').st_ino}]"

    def processes_in(self, alias):
        """Processes whose network namespace is that host's."""
        want, out = self.netns_id(alias), []
        for p in psutil.process_iter(["pid"]):
            try:
                if os.readlink(f"/proc/{p.pid}/ns/net") == want:
                    out.append(p)
            except OSError:
                pass
        return out

    def miniray_processes(self, alias):
        out = []
        for p in self.processes_in(alias):
            try:
                if any("miniray" in a for a in p.cmdline()) and p.status() != "zombie":
                    out.append(p)
            except psutil.Error:
                pass
        return out

    def drop_connections(self, alias):
        """SIGKILL the per-connection sshd processes of a host (its listener stays)."""
        listener = self.procs[alias].pid
        for p in self.processes_in(alias):
            try:
                if p.pid != listener and p.name() == "sshd":
                    p.send_signal(signal.SIGKILL)
            except psutil.Error:
                pass

    # -- teardown ----------------------------------------------------------------------------
    def close(self):
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for ns in self.namespaces:
            pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
            for pid in pids.stdout.split():
                try:
                    os.kill(int(pid), signal.SIGKILL)
                except (OSError, ValueError):
                    pass
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        self.namespaces = []
        subprocess.run(["ip", "link", "del", self.bridge], capture_output=True)
