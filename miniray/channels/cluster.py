"""``Cluster``: start a WorkerServer on each node over SSH and connect RemoteWorkers to it.

Per node: one SSH connection; ``miniray serve`` runs under a pty on it (so it gets SIGHUP if the
connection drops) bound to the address we reached the node at; the random per-cluster secret
is typed into its stdin with echo off, never on a command line; then ``num_workers``
RemoteWorkers connect, each with its own ``CUDA_VISIBLE_DEVICES`` when the node lists ``gpus``.
"""

import secrets
import shlex
import time
from concurrent.futures import ThreadPoolExecutor

from miniray.cluster.ssh import connect as ssh
from miniray.cluster.ssh.hosts import NodeConfig
from miniray.errors import ClusterError

from .framing import DEFAULT_MAX_SIZE
from .handshake import LISTENING, SECRET_PROMPT
from .remote import RemoteWorker


class _Node:
    def __init__(self, config, client, command, address, port, pid):
        self.config, self.client, self.command = config, client, command
        self.address, self.port, self.pid = address, port, pid


class Cluster:
    """Launch ``work_fn`` on every node and return connected ``RemoteWorker``s.

    >>> cluster = Cluster([NodeConfig("gpu1", num_workers=2, gpus=[0, 1])])  # doctest: +SKIP
    >>> workers = cluster.start("mypkg.serve.model_loop")                   # doctest: +SKIP
    >>> cluster.stop()                                                      # doctest: +SKIP

    ``ssh_options`` go to ``miniray.cluster.ssh.connect.connect`` (e.g. ``known_hosts=``,
    ``key_filename=``).
    """

    def __init__(self, nodes, *, codec="pickle", max_size=DEFAULT_MAX_SIZE, ssh_options=None,
                 start_timeout=60.0):
        self.nodes = [n if isinstance(n, NodeConfig) else NodeConfig(n) for n in nodes]
        self.codec, self.max_size, self.start_timeout = codec, max_size, start_timeout
        self.ssh_options = dict(ssh_options or {})
        self.workers = []
        self._nodes = []
        self._secret = None

    def __repr__(self):
        return f"<Cluster nodes={[n.host for n in self.nodes]} workers={len(self.workers)}>"

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.stop()

    def start(self, work_fn):
        """Start ``work_fn`` (``"package.module.function"``) everywhere; return the workers."""
        if self._nodes:
            raise RuntimeError("this Cluster is already started; stop() it first")
        self._secret = secrets.token_hex(32)
        with ThreadPoolExecutor(max(1, len(self.nodes))) as pool:
            futures = [pool.submit(self._start_node, n, work_fn) for n in self.nodes]
        errors = []
        for f in futures:
            try:
                self._nodes.append(f.result())
            except Exception as e:  # noqa: BLE001 - collected, reported together below
                errors.append(e)
        try:
            if len(errors) == 1:
                raise errors[0]  # keep SSHAuthError/SSHHostKeyError/... as they are
            if errors:
                raise ClusterError("; ".join(str(e) for e in errors)) from errors[0]
            for node in self._nodes:
                self.workers.extend(self._connect_workers(node))
        except BaseException:
            self.stop()
            raise
        return list(self.workers)

    def _start_node(self, cfg, work_fn):
        port = None if cfg.port == 22 else cfg.port  # 22 is the default: let ~/.ssh/config win
        client = ssh.connect(cfg.host, cfg.user, port, **self.ssh_options)
        try:
            address = client.get_transport().getpeername()[0]
            env = " ".join(f"{k}={shlex.quote(str(v))}" for k, v in (cfg.env or {}).items())
            cmd = (f"exec env {env} {shlex.quote(cfg.python or 'python3')} -m "
                   f"miniray.channels --host {shlex.quote(address)} --port 0 "
                   f"--work-fn {shlex.quote(work_fn)} --max-size {self.max_size} --secret-stdin")
            command = ssh.RemoteCommand(client, cmd, pty=True)
            listen_port, pid = self._handshake(cfg, command)
            return _Node(cfg, client, command, address, listen_port, pid)
        except BaseException:
            client.close()
            raise

    def _handshake(self, cfg, command):
        deadline = time.monotonic() + self.start_timeout
        try:
            while True:
                line = command.readline(timeout=max(0.01, deadline - time.monotonic()))
                if line.strip() == SECRET_PROMPT:
                    command.write(self._secret + "\n")
                elif line.startswith(LISTENING):
                    _, _host, port, pid = line.split()
                    return int(port), int(pid)
        except (EOFError, TimeoutError) as e:
            output = "\n    ".join(command.tail) or "(no output)"
            raise ClusterError(f"miniray serve did not start on {cfg.host}: {e}. Is miniray "
                               f"importable by {cfg.python or 'python3'} there (NodeConfig.python"
                               f", NodeConfig.env PYTHONPATH)? Its output:\n    {output}") from e

    def _connect_workers(self, node):
        cfg, workers = node.config, []
        for i in range(cfg.num_workers):
            env = {"MINIRAY_NODE_HOST": cfg.host, "MINIRAY_LOCAL_RANK": i}
            if cfg.gpus:
                env["CUDA_VISIBLE_DEVICES"] = str(list(cfg.gpus)[i % len(cfg.gpus)])
            workers.append(RemoteWorker(node.address, node.port, secret=self._secret,
                                        codec=self.codec, max_size=self.max_size, env=env))
        return workers

    def stop(self):
        """Close every worker, stop every server (SIGTERM, then the pty hang-up), disconnect."""
        for w in self.workers:
            w.close()
        self.workers = []
        for node in self._nodes:
            try:
                ssh.run(node.client, f"kill {node.pid}", timeout=10)
            except Exception:  # noqa: BLE001 - the hang-up below still stops it
                pass
            node.command.close()
            node.client.close()
        self._nodes = []
        self._secret = None

    def server_pids(self):
        """``{host: pid}`` of the running WorkerServers (useful to check that stop() worked)."""
        return {n.config.host: n.pid for n in self._nodes}
