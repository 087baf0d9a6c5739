"""Paramiko helpers: connect the way OpenSSH would, and run commands that die with the session.

Shared by ``miniray.channels.Cluster`` and the later ``SSHCluster``. Connection failures are
sorted into three errors that name the host: ``SSHAuthError`` (we reached it, it refused our
credentials), ``SSHHostKeyError`` (unknown or changed host key) and ``SSHUnreachableError``.
"""

import getpass
import os
import queue
import socket
import threading
from collections import deque

from .errors import SSHAuthError, SSHError, SSHHostKeyError, SSHUnreachableError


def _paramiko():
    try:
        import paramiko
    except ImportError as e:
        raise ImportError("SSH support needs paramiko: pip install 'miniray[ssh]'") from e
    return paramiko


def resolve_host(host, user=None, port=None, config_path="~/.ssh/config"):
    """Apply ``~/.ssh/config`` to ``host``: returns hostname, user, port, key files, known_hosts.

    Explicit ``user``/``port`` arguments win over the config file, which wins over defaults.
    """
    paramiko = _paramiko()
    path = os.path.expanduser(config_path) if config_path else None
    cfg = {}
    if path and os.path.exists(path):
        cfg = paramiko.SSHConfig.from_path(path).lookup(host)
    keys = [os.path.expanduser(k) for k in cfg.get("identityfile", [])]
    known = cfg.get("userknownhostsfile")
    return {
        "hostname": cfg.get("hostname", host),
        "user": user or cfg.get("user") or getpass.getuser(),
        "port": int(port or cfg.get("port") or 22),
        "key_filenames": [k for k in keys if os.path.exists(k)],
        "known_hosts": os.path.expanduser(known.split()[0]) if known else None,
        "proxycommand": cfg.get("proxycommand"),
    }


def connect(host, user=None, port=None, *, key_filename=None, known_hosts=None, timeout=10.0,
            config_path="~/.ssh/config", accept_unknown_host=False):
    """Open a ``paramiko.SSHClient`` to ``host`` honouring ~/.ssh/config, the agent and keys.

    Unknown host keys are refused (``SSHHostKeyError``) unless ``accept_unknown_host=True``;
    ``known_hosts`` adds a known_hosts file to the system one.
    """
    paramiko = _paramiko()
    info = resolve_host(host, user, port, config_path)
    where = f"{info['user']}@{host}" + (f" ({info['hostname']}:{info['port']})"
                                       if info["hostname"] != host or info["port"] != 22 else "")
    client = paramiko.SSHClient()
    client.load_system_host_keys()
    for path in (info["known_hosts"], known_hosts):
        if path and os.path.exists(path):
            client.load_host_keys(path)
    if accept_unknown_host:
        client.set_missing_host_key_policy(paramiko.AutoAddPolicy())
    else:
        client.set_missing_host_key_policy(_RejectUnknown(where, host))
    keys = ([key_filename] if isinstance(key_filename, str) else list(key_filename or []))
    keys += info["key_filenames"]
    sock = paramiko.ProxyCommand(info["proxycommand"]) if info["proxycommand"] else None
    try:
        client.connect(info["hostname"], port=info["port"], username=info["user"],
                       key_filename=keys or None, timeout=timeout, banner_timeout=timeout,
                       auth_timeout=timeout, allow_agent=True, look_for_keys=True, sock=sock)
    except SSHError:
        client.close()
        raise
    except paramiko.AuthenticationException as e:
        client.close()
        raise SSHAuthError(f"SSH authentication to {where} failed ({e}); check the key "
                           "(IdentityFile, key_filename=), the ssh agent and the host's "
                           "authorized_keys", host) from e
    except paramiko.BadHostKeyException as e:
        client.close()
        raise SSHHostKeyError(f"the host key of {where} does not match known_hosts: the host was "
                              "reinstalled or someone is intercepting; verify it, then remove the "
                              "old key with ssh-keygen -R", host) from e
    except (OSError, socket.timeout, paramiko.SSHException, EOFError) as e:
        client.close()
        raise SSHUnreachableError(f"cannot reach SSH server {where}: {e}; check the host name, "
                                  "port and that sshd is running", host) from e
    return client


def _RejectUnknown(where, host):
    paramiko = _paramiko()

    class RejectUnknown(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            raise SSHHostKeyError(
                f"host key of {where} ({key.get_name()}) is not in known_hosts; connect once with "
                "`ssh` to record it, pass known_hosts=, or accept_unknown_host=True", host)

    return RejectUnknown()


class RemoteCommand:
    """A command on an SSH connection, run under a pty so that it gets SIGHUP when the
    connection drops. Output (stdout and stderr merged by the pty) is drained by a thread, so a
    chatty command never blocks on a full pty; ``readline(timeout)`` reads it line by line and
    ``tail`` keeps the last lines for error messages.
    """

    def __init__(self, client, command, *, pty=True, tail_lines=200):
        self.command = command
        self._chan = client.get_transport().open_session()
        if pty:
            self._chan.get_pty(width=500)
        self._chan.exec_command(command)
        self._lines = queue.Queue()
        self.tail = deque(maxlen=tail_lines)
        self._reader = threading.Thread(target=self._drain, daemon=True,
                                        name=f"ssh-output:{command[:30]}")
        self._reader.start()

    def _drain(self):
        f = self._chan.makefile("rb")
        try:
            for raw in f:
                line = raw.decode(errors="replace").rstrip("\r\n")
                self.tail.append(line)
                self._lines.put(line)
        except OSError:
            pass
        finally:
            self._lines.put(None)  # EOF marker

    def readline(self, timeout=None):
        """Next output line; ``EOFError`` once the command has exited, ``TimeoutError``."""
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise TimeoutError(f"no output from {self.command!r} within {timeout}s") from None
        if line is None:
            self._lines.put(None)
            self._chan.status_event.wait(2)  # the exit status trails the end of output
            raise EOFError(f"{self.command!r} exited (status {self.exit_status})")
        return line

    def write(self, text):
        self._chan.sendall(text.encode())

    @property
    def exit_status(self):
        """None while running, else the remote exit status (-1 if unknown)."""
        return self._chan.recv_exit_status() if self._chan.exit_status_ready() else None

    def close(self):
        """Close the channel: the pty hangs up and the command gets SIGHUP."""
        self._chan.close()
        self._reader.join(timeout=5)


def run(client, command, timeout=30.0):
    """Run a short command without a pty; return ``(exit_status, output)``."""
    _, stdout, stderr = client.exec_command(command, timeout=timeout)
    out = stdout.read().decode(errors="replace") + stderr.read().decode(errors="replace")
    return stdout.channel.recv_exit_status(), out


class ReverseTunnel:
    """``ssh -R``: a port on the remote host's loopback whose connections reach ``target`` here.

    ``target`` is a unix socket path or a ``(host, port)`` pair on this machine; the remote end
    listens on ``127.0.0.1:<port>`` only (sshd's GatewayPorts does not apply to a loopback
    bind). Each forwarded connection gets a pump thread; everything closes with ``close()`` or
    with the SSH connection.
    """

    def __init__(self, client, target, remote_port=0):
        self.target = target
        self._transport = client.get_transport()
        self._closed = False
        self._open = set()
        self._lock = threading.Lock()
        paramiko = _paramiko()
        try:
            self.port = self._transport.request_port_forward("127.0.0.1", remote_port,
                                                             handler=self._on_channel)
        except paramiko.SSHException as e:
            raise SSHError(f"the host refused a reverse port forward ({e}): its sshd needs "
                           "`AllowTcpForwarding yes` (or `remote`) in sshd_config") from e

    def _on_channel(self, chan, origin, server):
        # called from paramiko's transport thread: never block it
        threading.Thread(target=self._pump, args=(chan,), daemon=True,
                         name="ssh-reverse-tunnel").start()

    def _pump(self, chan):
        import select

        try:
            if isinstance(self.target, str):
                sock = socket.socket(socket.AF_UNIX)
                sock.connect(self.target)
            else:
                sock = socket.create_connection(tuple(self.target), timeout=10)
                sock.settimeout(None)
        except OSError:
            chan.close()
            return
        with self._lock:
            if self._closed:
                sock.close()
                chan.close()
                return
            self._open.add((chan, sock))
        try:
            while True:
                ready, _, _ = select.select([chan, sock], [], [], 1.0)
                if self._closed:
                    break
                if chan in ready:
                    data = chan.recv(65536)
                    if not data:
                        break
                    sock.sendall(data)
                if sock in ready:
                    data = sock.recv(65536)
                    if not data:
                        break
                    chan.sendall(data)
        except (OSError, EOFError):
            pass
        finally:
            with self._lock:
                self._open.discard((chan, sock))
            sock.close()
            chan.close()

    @property
    def connections(self):
        """How many forwarded connections are open now."""
        with self._lock:
            return len(self._open)

    def close(self):
        """Stop listening on the remote port and close every forwarded connection."""
        with self._lock:
            self._closed = True
            pairs = list(self._open)
        try:
            if self._transport.is_active():
                self._transport.cancel_port_forward("127.0.0.1", self.port)
        except Exception:  # noqa: BLE001 - the connection is going away anyway
            pass
        for chan, sock in pairs:
            for end in (chan, sock):
                try:
                    end.close()
                except OSError:
                    pass


def put_file(client, local_path, remote_path):
    """Copy ``local_path`` to ``remote_path`` on the host with SFTP (``~/`` is the login dir).

    Hosts whose sshd has no sftp subsystem get the bytes through ``cat`` instead.
    """
    paramiko = _paramiko()
    if remote_path.startswith("~/"):
        remote_path = remote_path[2:]
    try:
        sftp = client.open_sftp()
    except paramiko.SSHException:
        sftp = None
    if sftp is not None:
        try:
            sftp.put(local_path, remote_path)
        finally:
            sftp.close()
        return remote_path
    import shlex

    chan = client.get_transport().open_session()
    chan.exec_command(f"cat > {shlex.quote(remote_path)}")
    with open(local_path, "rb") as f:
        while True:
            block = f.read(1 << 16)
            if not block:
                break
            chan.sendall(block)
    chan.shutdown_write()
    status = chan.recv_exit_status()
    chan.close()
    if status != 0:
        raise SSHError(f"cannot write {remote_path} on the host (no sftp, and cat exited "
                       f"with status {status})")
    return remote_path
