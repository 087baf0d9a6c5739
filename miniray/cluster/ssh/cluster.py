"""``SSHCluster``: miniray workers on machines you can ``ssh`` into, and nothing else.

Per host, in parallel::

    notebook                                         host (only port 22 open)
    --------                                         ------------------------
    connect (paramiko: ~/.ssh/config, agent, keys) -> sshd
    pre-flight: Python, cloudpickle, miniray       -> python -c PROBE       (install=True: venv)
    Redis (unix socket) <- pump <- ssh -R 127.0.0.1:PORT <- miniray worker --slots N  (under a pty)
    wait for the worker's first heartbeat

The server never leaves loopback; the worker reaches it through the reverse tunnel and reads
the URL (with the password) from its stdin with echo off, so it is on no command line and in
no log. The worker runs under a pty: when the connection drops, or this process exits, sshd
hangs it up (SIGHUP), and it exits anyway once its server connection is gone; the tasks it
held are requeued by the other workers' reaper after MINIRAY_WORKER_DEAD_SECONDS.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import shlex
import sys
import threading
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import parse_qs, quote, unquote, urlparse

from miniray.errors import ConfigurationError, SSHClusterError, SSHError, SSHUnreachableError

from . import connect as ssh
from . import preflight as sshprep
from .checklist import Checklist
from .hosts import _URL_PROMPT, HOST_FORMS, NodeConfig, parse_hosts

__all__ = ["SSHCluster", "NodeConfig", "parse_hosts"]

log = logging.getLogger("miniray.sshcluster")

_FORWARDED = ("MINIRAY_NAMESPACE", "MINIRAY_HEARTBEAT_SECONDS", "MINIRAY_WORKER_DEAD_SECONDS",
              "MINIRAY_MAX_RETRIES", "MINIRAY_FUNCTION_TTL_SECONDS", "MINIRAY_RESULT_TTL_SECONDS",
              "MINIRAY_LOG_STREAM_MAXLEN", "MINIRAY_LOG_LINE_MAX_BYTES",
              "MINIRAY_EVENT_STREAM_MAXLEN", "MINIRAY_KILL_GRACE_SECONDS",
              "MINIRAY_SERVER_GONE_SECONDS")


class _Host:
    def __init__(self, label, cfg):
        self.label, self.cfg = label, cfg
        self.client = self.tunnel = self.command = self.versions = None
        self.python = cfg.python or "python3"
        self.pid = None
        self.name = label
        self.exited = threading.Event()


class SSHCluster:
    """miniray workers on SSH hosts, bound to a private server here through reverse tunnels.

    >>> with miniray.SSHCluster(["gpu1", "me@gpu2:2222"], slots=8) as cluster:  # doctest: +SKIP
    ...     ex = cluster.executor()
    ...     print(list(ex.map(socket.gethostname, range(4))))

    ``hosts``: ``"name"``, ``"user@name"``, ``"user@name:port"``, ``"ssh://user@name:port"``,
    any of them with ``=SLOTS`` (``"gpu1=8"``), or ``NodeConfig``s (per-host ``slots``,
    ``python``, ``gpus``, ``env`` win over the arguments); ``name:N`` is always SSH port N.
    ``connect_kwargs`` are paramiko's ``SSHClient.connect`` keywords, as in Fabric
    (``key_filename``, ``look_for_keys``, ``allow_agent``, ``passphrase``, ``timeout``, ...);
    an unknown one is a ``ConfigurationError``. Host keys are checked against
    ``known_hosts`` (default: ~/.ssh/config's UserKnownHostsFile, else ~/.ssh/known_hosts);
    ``accept_new_host_keys=True`` trusts and records the key of a host never seen before
    (OpenSSH's ``StrictHostKeyChecking=accept-new``); a changed key is always refused.
    ``install=True`` installs this miniray into a venv on hosts whose versions differ.
    ``redis_url`` joins an existing server on this machine instead of starting a private one.
    ``callback(host, step)`` follows the startup checklist (``.status``) step by step.
    On any failure everything started is stopped and the error names each host and the fix.
    """

    def __init__(self, hosts, slots=None, python=None, gpus=None, install=False,
                 connect_kwargs=None, *, env=None, redis_url=None, callback=None,
                 install_dir="~/.cache/miniray", timeout=60.0, start=True, known_hosts=None,
                 accept_new_host_keys=False):
        self.nodes = parse_hosts(hosts, slots, python, gpus, env)
        if not self.nodes:
            raise ConfigurationError("SSHCluster needs at least one host")
        self.install, self.install_dir, self.timeout = install, install_dir, timeout
        self.connect_kwargs = dict(connect_kwargs or {})
        ssh.check_connect_kwargs(self.connect_kwargs)
        self._host_keys = {"known_hosts": known_hosts,
                           "accept_new_host_keys": accept_new_host_keys}
        self._hosts = {}
        for n in self.nodes:
            label = n.host if n.port == 22 else f"{n.host}:{n.port}"
            label = f"{n.user}@{label}" if n.user else label
            while label in self._hosts:
                label += "'"
            self._hosts[label] = _Host(label, n)
        self.status = Checklist(list(self._hosts), callback)
        self._own_server = None
        self._redis_url = redis_url
        self.url = None
        self._closed = False
        self._started = False
        atexit.register(_close_ref, weakref.ref(self))
        if start:
            self.start()

    def __repr__(self):
        return (f"<miniray.SSHCluster hosts={list(self._hosts)} "
                f"{'closed' if self._closed else 'ready' if self.status.ready else 'starting'}>")

    def _repr_mimebundle_(self, include=None, exclude=None):
        return self.status._repr_mimebundle_(include, exclude)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # -- start -------------------------------------------------------------------------------
    def start(self):
        """Connect, check, (install,) tunnel, start and wait for every host's worker."""
        if self._started:
            raise RuntimeError("this SSHCluster is already started")
        self._started = True
        try:
            self._start_server()
            self._parallel(self._connect_and_check)
            self._reconcile_versions()
            self._parallel(self._launch)
        except BaseException as e:
            if isinstance(e, SSHError):
                e.status = self.status
            self.status.stop()
            self.close()
            raise
        return self

    def _start_server(self):
        if self._redis_url is None:
            from miniray.cluster.server import ServerProcess

            self._own_server = ServerProcess()
            self._redis_url = self._own_server.url
        self.url = self._redis_url
        u = urlparse(self.url)
        if u.scheme == "unix":
            self._target = u.path
        elif u.hostname in ("127.0.0.1", "localhost", "::1"):
            self._target = (u.hostname, u.port or 6379)
        else:
            raise ConfigurationError("SSHCluster tunnels to a server on this machine: give a "
                                     "unix:// or redis://...@127.0.0.1 URL, not "
                                     f"{u.hostname}")
        self._password = u.password and unquote(u.password) or \
            parse_qs(u.query).get("password", [None])[0]

    def _parallel(self, step, hosts=None):
        hosts = list(self._hosts.values()) if hosts is None else hosts
        errors = {}
        with ThreadPoolExecutor(max(1, len(hosts))) as pool:
            futures = {h.label: pool.submit(self._guarded, step, h) for h in hosts}
        for label, f in futures.items():
            if f.exception() is not None:
                errors[label] = f.exception()
        _raise_for(errors)

    def _guarded(self, step, h):
        try:
            step(h)
        except BaseException as e:
            name = self.status.running_step(h.label)
            if not isinstance(e, SSHError):
                e = SSHClusterError(f"{h.label}: {name} failed: {e}", h.label, {h.label: e})
            self.status.fail(h.label, name, e)
            raise e

    def _connect_and_check(self, h):
        cfg = h.cfg
        self.status.begin(h.label, "connected")
        recorded = []
        try:
            h.client = ssh.connect(cfg.host, cfg.user, None if cfg.port == 22 else cfg.port,
                                   **self._host_keys, **self.connect_kwargs,
                                   on_new_host_key=lambda name, key, path: recorded.append(
                                       f"; new host key {key.get_name()} {key.fingerprint} "
                                       f"recorded in {path}"))
        except SSHUnreachableError as e:
            if cfg.port == 22 or cfg.port >= 1024:
                raise
            # `%miniray up gpu1:8` once meant 8 slots: a small port is worth a word
            raise SSHUnreachableError(f"{e} (in {h.label}, {cfg.port} is the SSH port; for "
                                      f"{cfg.port} slots write {cfg.host}={cfg.port})",
                                      e.host) from e
        peer = h.client.get_transport().getpeername()
        self.status.done(h.label, "connected", f"{peer[0]}:{peer[1]}" + "".join(recorded))
        self.status.begin(h.label, "checked")
        h.versions = sshprep.probe(h.client, h.python, h.label)
        v = h.versions
        self.status.done(h.label, "checked", f"{v['executable']}: Python {v['python']}, "
                         f"cloudpickle {v['cloudpickle']}, miniray {v['miniray']}")

    def _reconcile_versions(self):
        local = sshprep.local_versions()
        found = {h.label: (h.python, sshprep.mismatches(h.versions, local))
                 for h in self._hosts.values()}
        found = {k: v for k, v in found.items() if v[1]}
        python_differs = any(w == "Python" for _, p in found.values() for w, _, _ in p)
        if found and (not self.install or python_differs):
            err = sshprep.preflight_error(found, local, self.install)
            for label in found:  # each host's row gets its own mismatches and the fix
                self.status.fail(label, "installed" if self.install else "checked",
                                 sshprep.preflight_error({label: found[label]}, local,
                                                         self.install))
            raise err
        todo = [self._hosts[label] for label in found]
        for h in self._hosts.values():
            if h not in todo:
                self.status.skip(h.label, "installed", "versions match")
        if todo:
            self._parallel(lambda h: self._install(h, local), todo)

    def _install(self, h, local):
        self.status.begin(h.label, "installed")
        h.python = sshprep.install(h.client, h.python, h.label, self.install_dir, local)
        h.versions = sshprep.probe(h.client, h.python, h.label)
        left = sshprep.mismatches(h.versions, local)
        if left:
            raise sshprep.preflight_error({h.label: (h.python, left)}, local, True)
        self.status.done(h.label, "installed", f"miniray {local['miniray']} in {h.python}")

    def _launch(self, h):
        cfg = h.cfg
        self.status.begin(h.label, "tunnelled")
        h.tunnel = ssh.ReverseTunnel(h.client, self._target)
        self.status.done(h.label, "tunnelled", f"127.0.0.1:{h.tunnel.port} on the host")
        self.status.begin(h.label, "started")
        h.name = re.sub(r"[^\w.@:'-]", "_", h.label)
        env = {k: os.environ[k] for k in _FORWARDED if os.environ.get(k)}
        env.update({"PYTHONUNBUFFERED": "1", **(cfg.env or {})})
        slots = cfg.slots or h.versions.get("cpus") or 1
        args = ["--slots", str(slots), "--name", h.name]
        if cfg.gpus is not None:
            gpus = cfg.gpus if isinstance(cfg.gpus, str) else ",".join(map(str, cfg.gpus))
            args += ["--gpus", gpus or "none"]
        cmd = ("exec env " + " ".join(f"{k}={shlex.quote(str(v))}" for k, v in env.items())
               + f" {shlex.quote(h.python)} -c "
               + shlex.quote("import miniray.cluster.ssh.hosts as m; m.remote_main()")
               + " " + " ".join(shlex.quote(a) for a in args))
        h.command = ssh.RemoteCommand(h.client, cmd, pty=True)
        url = f"redis://:{quote(self._password or '', safe='')}@127.0.0.1:{h.tunnel.port}"
        deadline = time.monotonic() + self.timeout
        while True:
            line = self._readline(h, deadline)
            if line.startswith(_URL_PROMPT):
                h.pid = int(line.split()[1])
                h.command.write(url + "\n")
                break
        threading.Thread(target=self._follow, args=(h,), daemon=True,
                         name=f"miniray-ssh-{h.label}").start()
        self.status.done(h.label, "started", f"pid {h.pid}, {slots} slot(s)")
        self.status.begin(h.label, "first heartbeat")
        from miniray.broker import connect
        from miniray.client.observe import list_workers
        from miniray.config import settings
        from miniray.keys import Keys

        r = connect(self.url)
        try:
            keys = Keys(settings().namespace)
            while True:
                for w in list_workers(r, keys):
                    if w.get("name") == h.name and w.get("pid") == h.pid:
                        self.status.done(h.label, "first heartbeat", w.get("host", ""))
                        return
                if h.exited.is_set() or time.monotonic() > deadline:
                    raise SSHClusterError(self._start_failure(h, "did not heartbeat"), h.label)
                time.sleep(0.05)
        finally:
            r.close()

    def _readline(self, h, deadline):
        try:
            return h.command.readline(timeout=max(0.01, deadline - time.monotonic()))
        except (EOFError, TimeoutError) as e:
            raise SSHClusterError(self._start_failure(h, str(e)), h.label) from None

    def _start_failure(self, h, what):
        tail = "\n    ".join(list(h.command.tail)[-20:]) or "(no output)"
        return (f"{h.label}: the miniray worker ({h.python}) {what} within {self.timeout:.0f}s;"
                f" its output:\n    {tail}")

    def _follow(self, h):
        """Drain the worker's output into logging; note when it exits."""
        try:
            while True:
                log.debug("%s: %s", h.label, h.command.readline())
        except (EOFError, OSError):
            pass
        finally:
            h.exited.set()
            if not self._closed:
                log.warning("the miniray worker on %s exited (status %s)", h.label,
                            h.command.exit_status)

    # -- use ---------------------------------------------------------------------------------
    def executor(self, **kwargs):
        """A ``miniray.Executor`` whose tasks run on this cluster's workers."""
        from miniray.client.executor import Executor

        if self.url is None or self._closed:
            raise RuntimeError("this SSHCluster is not running")
        return Executor(redis_url=self.url, **kwargs)

    def workers(self):
        """The cluster's live workers as heartbeats (dicts: name, host, pid, slots, ...)."""
        from miniray.broker import connect
        from miniray.client.observe import list_workers
        from miniray.config import settings
        from miniray.keys import Keys

        names = {h.name for h in self._hosts.values()}
        r = connect(self.url)
        try:
            return [w for w in list_workers(r, Keys(settings().namespace)) if w["name"] in names]
        finally:
            r.close()

    def worker_pids(self):
        """``{host: pid}`` of the remote workers still running."""
        return {h.label: h.pid for h in self._hosts.values()
                if h.pid is not None and not h.exited.is_set()}

    # -- stop --------------------------------------------------------------------------------
    def close(self, timeout=10.0):
        """Stop every worker (SIGTERM: held tasks go back to the queue), close tunnels and
        connections, stop the private server. Safe to call twice."""
        if self._closed:
            return
        self._closed = True
        hosts = [h for h in self._hosts.values() if h.client is not None]
        if hosts:
            with ThreadPoolExecutor(len(hosts)) as pool:
                list(pool.map(lambda h: _stop_host(h, timeout), hosts))
        if self._own_server is not None:
            self._own_server.close()
            self._own_server = None


def _stop_host(h, timeout):
    try:
        if h.command is not None and h.pid is not None and not h.exited.is_set():
            try:
                ssh.run(h.client, f"kill -TERM {h.pid}", timeout=timeout)
            except Exception:  # noqa: BLE001 - the hang-up below still stops it
                pass
            h.exited.wait(timeout)
        if h.command is not None:
            h.command.close()
        if h.tunnel is not None:
            h.tunnel.close()
    finally:
        h.client.close()


def _close_ref(ref):
    cluster = ref()
    if cluster is not None:
        cluster.close(timeout=3.0)


def _raise_for(errors):
    if not errors:
        return
    unique = list({id(e): e for e in errors.values()}.values())
    if len(unique) == 1:
        raise unique[0]
    lines = "\n".join(f"  {host}: {type(e).__name__}: {e}" for host, e in errors.items())
    raise SSHClusterError(f"{len(errors)} host(s) failed:\n{lines}", next(iter(errors)), errors)


def main(argv=None):
    """``miniray ssh-up HOST[=SLOTS] ...``: workers on SSH hosts until Ctrl-C."""
    import argparse
    import signal

    p = argparse.ArgumentParser(prog="miniray ssh-up", description="start miniray workers on "
                                "SSH hosts, tunnelled to a private server here, until Ctrl-C")
    p.add_argument("hosts", nargs="+", help=HOST_FORMS.replace("%", "%%"))
    p.add_argument("-n", "--slots", type=int, default=None, help="tasks at once on each host "
                   "without =SLOTS (default: its cores)")
    p.add_argument("--python", default=None, help="Python on the hosts (default python3)")
    p.add_argument("--gpus", default=None, help="GPU indices each worker owns, e.g. 0,1")
    p.add_argument("--install", action="store_true", help="install this miniray on hosts "
                   "whose versions differ")
    p.add_argument("--timeout", type=float, default=60.0)
    p.add_argument("-i", "--identity", action="append", metavar="FILE", help="a private key "
                   "to log in with, like ssh -i (repeatable)")
    p.add_argument("--known-hosts", metavar="FILE", help="check host keys against FILE "
                   "instead of ~/.ssh/known_hosts (ssh -o UserKnownHostsFile=FILE)")
    p.add_argument("--accept-new-host-keys", action="store_true", help="trust and record the "
                   "key of a host not seen before (ssh -o StrictHostKeyChecking=accept-new)")
    args = p.parse_args(argv)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    try:
        nodes = parse_hosts(args.hosts, args.slots, args.python, args.gpus)
    except ConfigurationError as e:
        p.error(str(e))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    try:
        cluster = SSHCluster(nodes, install=args.install, timeout=args.timeout,
                             connect_kwargs={"key_filename": args.identity} if args.identity
                             else None, known_hosts=args.known_hosts,
                             accept_new_host_keys=args.accept_new_host_keys,
                             callback=lambda host, step: print(
                                 f"{host}: {step.name} {step.state} {step.detail}", flush=True))
    except (SSHError, ConfigurationError) as e:
        print(f"miniray ssh-up: {e}", file=sys.stderr)
        return 2
    print(cluster.status, flush=True)
    print(f"MINIRAY_REDIS_URL={cluster.url}", flush=True)
    print("(this URL holds the password; Ctrl-C stops everything)", flush=True)
    try:
        while not stop.is_set() and cluster.worker_pids():
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    cluster.close()
    return 0
