"""Paramiko helpers: connect the way OpenSSH would, and run commands that die with the session.

Shared by ``miniray.channels.Cluster`` and the later ``SSHCluster``. Connection failures are
sorted into three errors that name the host: ``SSHAuthError`` (we reached it, it refused our
credentials), ``SSHHostKeyError`` (unknown or changed host key) and ``SSHUnreachableError``.
"""

import difflib
import getpass
import inspect
import logging
import os
import queue
import socket
import threading
from collections import deque

from miniray.errors import (
    ConfigurationError,
    SSHAuthError,
    SSHError,
    SSHHostKeyError,
    SSHUnreachableError,
)

log = logging.getLogger("miniray.ssh")


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
        "known_hosts": [os.path.expanduser(k) for k in known.split()] if known else [],
        "proxycommand": cfg.get("proxycommand"),
    }


# miniray sets these from the host ("user@host:port", NodeConfig, ~/.ssh/config)
_FROM_HOST = ("hostname", "port", "username")
_GLOBAL_KNOWN_HOSTS = "/etc/ssh/ssh_known_hosts"


def connect_keywords():
    """The keywords of paramiko's ``SSHClient.connect`` that ``connect_kwargs`` may hold."""
    params = inspect.signature(_paramiko().SSHClient.connect).parameters
    return [n for n in params if n not in ("self",) + _FROM_HOST]


def check_connect_kwargs(kwargs):
    """Raise ``ConfigurationError`` naming a keyword paramiko's ``SSHClient.connect`` does not
    take (or one miniray sets from the host), and a key file that does not exist."""
    allowed = connect_keywords()
    for k in kwargs:
        if k in _FROM_HOST:
            raise ConfigurationError(
                f"connect_kwargs: {k!r} comes from the host: write it as user@host:port (or "
                "NodeConfig(user=..., port=...), or User/Port in ~/.ssh/config)")
        if k not in allowed:
            near = difflib.get_close_matches(k, allowed, n=1)
            hint = f" (did you mean {near[0]!r}?)" if near else ""
            raise ConfigurationError(
                f"connect_kwargs: {k!r} is not a keyword of paramiko's SSHClient.connect{hint}; "
                f"it takes {', '.join(allowed)}")
    for path in _key_files(kwargs.get("key_filename")):
        if not os.path.isfile(path):
            raise ConfigurationError(f"the identity (key) file {path} does not exist; give the "
                                     "path of a private key, e.g. ~/.ssh/id_ed25519")


def _key_files(key_filename):
    files = [key_filename] if isinstance(key_filename, (str, os.PathLike)) else key_filename
    return [os.path.expanduser(os.fspath(k)) for k in files or ()]


def connect(host, user=None, port=None, *, known_hosts=None, accept_new_host_keys=False,
            config_path="~/.ssh/config", on_new_host_key=None, **connect_kwargs):
    """Open a ``paramiko.SSHClient`` to ``host`` honouring ~/.ssh/config, the agent and keys.

    ``connect_kwargs`` are paramiko's ``SSHClient.connect`` keywords (``key_filename``,
    ``look_for_keys``, ``allow_agent``, ``passphrase``, ``timeout`` (default 10 s), ...); key
    files given there are tried before ~/.ssh/config's IdentityFile. Host keys are checked as
    OpenSSH does: against /etc/ssh/ssh_known_hosts and the user's file, ``known_hosts`` (else
    the config's UserKnownHostsFile, else ~/.ssh/known_hosts). An unknown host key is refused
    (``SSHHostKeyError``) unless ``accept_new_host_keys=True`` (OpenSSH's
    ``StrictHostKeyChecking=accept-new``), which records it in that file and calls
    ``on_new_host_key(name, key, path)``; a changed key is always refused.
    """
    paramiko = _paramiko()
    check_connect_kwargs(connect_kwargs)
    info = resolve_host(host, user, port, config_path)
    where = f"{info['user']}@{host}" + (f" ({info['hostname']}:{info['port']})"
                                       if info["hostname"] != host or info["port"] != 22 else "")
    files = [os.path.expanduser(known_hosts)] if known_hosts else (
        info["known_hosts"] or [os.path.expanduser("~/.ssh/known_hosts")])
    client = paramiko.SSHClient()
    if os.path.exists(_GLOBAL_KNOWN_HOSTS):
        client.load_system_host_keys(_GLOBAL_KNOWN_HOSTS)
    for path in files:
        if os.path.exists(path):
            client.load_host_keys(path)
    ssh_cmd = "ssh" + (f" -p {port}" if port else "") + (
        f" -o UserKnownHostsFile={known_hosts}" if known_hosts else "") + (
        f" {user}@{host}" if user else f" {host}")
    if accept_new_host_keys:
        client.set_missing_host_key_policy(_AcceptNew(files[0], on_new_host_key))
    else:
        client.set_missing_host_key_policy(_RejectUnknown(where, host, files[0], ssh_cmd))
    kwargs = dict(connect_kwargs)
    kwargs.setdefault("timeout", 10.0)
    kwargs.setdefault("banner_timeout", kwargs["timeout"])
    kwargs.setdefault("auth_timeout", kwargs["timeout"])
    keys = _key_files(kwargs.pop("key_filename", None)) + info["key_filenames"]
    if "sock" not in kwargs and info["proxycommand"]:
        kwargs["sock"] = paramiko.ProxyCommand(info["proxycommand"])
    try:
        client.connect(info["hostname"], port=info["port"], username=info["user"],
                       key_filename=keys or None, **kwargs)
    except SSHError:
        client.close()
        raise
    except paramiko.PasswordRequiredException as e:
        client.close()
        raise SSHAuthError(f"SSH authentication to {where} failed: a private key is encrypted "
                           f"({e}); add it to the ssh agent (ssh-add FILE) or pass "
                           "connect_kwargs={'passphrase': ...}", host) from e
    except paramiko.AuthenticationException as e:
        client.close()
        raise SSHAuthError(f"SSH authentication to {where} failed ({e}); check the key "
                           "(-i FILE, IdentityFile in ~/.ssh/config, key_filename=), the ssh "
                           "agent and the host's authorized_keys", host) from e
    except paramiko.BadHostKeyException as e:
        client.close()
        name = (info["hostname"] if info["port"] == 22
                else f"[{info['hostname']}]:{info['port']}")  # as known_hosts spells it
        raise SSHHostKeyError(_changed_key_message(where, name, e, files[0]), host) from e
    except (OSError, socket.timeout, paramiko.SSHException, EOFError) as e:
        client.close()
        raise SSHUnreachableError(f"cannot reach SSH server {where}: {e}; check the host name, "
                                  "port and that sshd is running", host) from e
    return client


def _changed_key_message(where, name, e, path):
    return (f"the host key of {where} has CHANGED: known_hosts has {e.expected_key.get_name()} "
            f"{e.expected_key.fingerprint} for {name}, the host sent {e.key.get_name()} "
            f"{e.key.fingerprint}. The host was reinstalled, or someone is intercepting the "
            "connection: check the new key with the host's owner, then remove the old one with "
            f"`ssh-keygen -R '{name}' -f {path}` and connect again "
            "(--accept-new-host-keys records a new key, never a changed one)")


def _RejectUnknown(where, host, path, ssh_cmd):
    paramiko = _paramiko()

    class RejectUnknown(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            raise SSHHostKeyError(
                f"the host key of {where} ({key.get_name()} {key.fingerprint}) is not in "
                f"known_hosts ({path}), so the host cannot be told from an impostor. If it is "
                f"the host you mean, record its key: run `{ssh_cmd}` once and answer yes, or "
                "pass --accept-new-host-keys (%miniray up) / accept_new_host_keys=True "
                f"(SSHCluster), which records it in {path}", host)

    return RejectUnknown()


_record_lock = threading.Lock()


def _AcceptNew(path, on_new):
    """OpenSSH's ``StrictHostKeyChecking=accept-new``: an unknown host's key is trusted and
    appended to ``path``; a changed key still fails (paramiko raises BadHostKeyException
    before it asks the policy)."""
    paramiko = _paramiko()

    class AcceptNew(paramiko.MissingHostKeyPolicy):
        def missing_host_key(self, client, hostname, key):
            line = paramiko.hostkeys.HostKeyEntry([hostname], key).to_line()
            with _record_lock:
                os.makedirs(os.path.dirname(path) or ".", mode=0o700, exist_ok=True)
                sep = ""
                if os.path.exists(path) and os.path.getsize(path):
                    with open(path, "rb") as f:
                        f.seek(-1, os.SEEK_END)
                        sep = "" if f.read(1) == b"\n" else "\n"
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                with os.fdopen(fd, "a") as f:
                    f.write(sep + line)
            client.get_host_keys().add(hostname, key.get_name(), key)
            log.info("recorded the new host key of %s (%s %s) in %s", hostname,
                     key.get_name(), key.fingerprint, path)
            if on_new is not None:
                on_new(hostname, key, path)

    return AcceptNew()


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
