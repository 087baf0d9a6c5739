"""How SSH hosts are named and described (``parse_hosts``, ``NodeConfig``: shared with
``miniray.channels.Cluster``) and the bootstrap that starts a worker on one.

The bootstrap runs on the host with only miniray importable: it turns the pty's echo off,
asks for the server URL on stdin (so the password is on no command line and in no output),
then runs ``miniray worker``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys
from dataclasses import dataclass

from miniray.errors import ConfigurationError

__all__ = ["HOST_FORMS", "NodeConfig", "parse_hosts", "node_from_string", "remote_main"]


@dataclass
class NodeConfig:
    """One machine of a Cluster or an SSHCluster. ``python`` defaults to ``python3`` on the
    node's PATH; ``env`` is set for the processes started there. For a ``Cluster``,
    ``num_workers`` RemoteWorkers are started and ``gpus`` dealt round-robin to them; for an
    ``SSHCluster``, one ``miniray worker`` runs ``slots`` tasks at once (default: the host's
    cores) and owns ``gpus`` (default: what NVML finds there)."""

    host: str
    user: str = None
    port: int = 22
    num_workers: int = 1
    python: str = None
    gpus: list = None
    env: dict = None
    slots: int = None


_URL_PROMPT = "MINIRAY_REDIS_URL?"  # printed (echo off) by remote_main, with its pid
_HOST_RE = re.compile(r"^(?:ssh://)?(?:(?P<user>[^@/:=\[\]\s]+)@)?"
                      r"(?P<host>\[[^\]\s]+\]|[^@:/=\[\]\s]+)(?::(?P<port>\d+))?"
                      r"(?::(?P<extra>\d+))?(?:=(?P<slots>\d+))?$")
HOST_FORMS = ("HOST, USER@HOST, USER@HOST:PORT or ssh://USER@HOST:PORT (PORT is the SSH port, "
              "22 by default), each optionally followed by =SLOTS (tasks at once on that host)")


def node_from_string(spec):
    """``"me@gpu1:2222=8"`` -> ``NodeConfig("gpu1", user="me", port=2222, slots=8)``.

    ``HOST:N`` is always SSH port N (as in ``ssh://`` URLs and Fabric); slots are ``HOST=N``.
    """
    text = spec.strip()
    m = _HOST_RE.match(text)
    if not m:
        raise ConfigurationError(f"cannot read the host {spec!r}: write {HOST_FORMS}, "
                                 "e.g. gpu1, me@gpu1:2222 or gpu1=8")
    if m["extra"] is not None:
        hostport = text.rsplit(":", 1)[0]
        raise ConfigurationError(
            f"{spec!r}: HOST:PORT:SLOTS is no longer read (HOST:N is the SSH port); write "
            f"{hostport}={m['extra']} for {m['extra']} slots on port {m['port']}")
    host, user = m["host"].strip("[]"), m["user"]
    port = int(m["port"]) if m["port"] is not None else 22
    if not 0 < port < 65536:
        raise ConfigurationError(f"{spec!r}: port {port} is not a TCP port (1-65535)")
    slots = int(m["slots"]) if m["slots"] is not None else None
    if slots is not None and slots < 1:
        raise ConfigurationError(f"{spec!r}: a host needs at least 1 slot, not {slots}")
    return NodeConfig(host, user=user, port=port, slots=slots)


def parse_hosts(specs, slots=None, python=None, gpus=None, env=None):
    """Hosts as users type them, for ``SSHCluster``, ``%miniray up`` and ``miniray ssh-up``:
    ``HOST``, ``USER@HOST``, ``USER@HOST:PORT`` or ``ssh://USER@HOST:PORT``, each optionally
    with ``=SLOTS``; ``NodeConfig``s pass through. Per-host values win over the arguments.

    >>> [(n.host, n.user, n.port, n.slots) for n in parse_hosts(["gpu1=8", "me@h:2222"])]
    [('gpu1', None, 22, 8), ('h', 'me', 2222, None)]
    """
    if isinstance(specs, (str, NodeConfig)):
        specs = [specs]
    nodes = []
    for spec in specs:
        if isinstance(spec, NodeConfig):
            n = dataclasses.replace(spec)
        elif isinstance(spec, str):
            n = node_from_string(spec)
        else:
            raise ConfigurationError(f"a host is a string ({HOST_FORMS}) or a NodeConfig, "
                                     f"not {type(spec).__name__} {spec!r}")
        n.slots = n.slots if n.slots is not None else slots
        n.python = n.python or python
        n.gpus = n.gpus if n.gpus is not None else gpus
        n.env = {**(env or {}), **(n.env or {})}
        nodes.append(n)
    return nodes


def remote_main():
    """On the host: read the server URL from stdin with echo off, then run the worker."""
    import termios

    try:
        attrs = termios.tcgetattr(0)
        attrs[3] &= ~termios.ECHO
        termios.tcsetattr(0, termios.TCSANOW, attrs)
    except termios.error:
        pass
    print(_URL_PROMPT, os.getpid(), flush=True)
    os.environ["MINIRAY_REDIS_URL"] = sys.stdin.readline().strip()
    from miniray.worker.cli import main

    sys.exit(main(sys.argv[1:]))
