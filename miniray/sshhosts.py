"""How SSH hosts are named (``parse_hosts``) and the bootstrap that starts a worker on one.

The bootstrap runs on the host with only miniray importable: it turns the pty's echo off,
asks for the server URL on stdin (so the password is on no command line and in no output),
then runs ``miniray worker``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import sys

from .channels.cluster import NodeConfig
from .errors import ConfigurationError

__all__ = ["NodeConfig", "parse_hosts", "node_from_string", "remote_main"]

_URL_PROMPT = "MINIRAY_REDIS_URL?"  # printed (echo off) by remote_main, with its pid
_HOST_RE = re.compile(r"^(?:ssh://)?(?:(?P<user>[^@/:]+)@)?(?P<host>\[[^\]]+\]|[^@:/]+)"
                      r"(?::(?P<a>\d+))?(?::(?P<b>\d+))?$")


def node_from_string(spec, colon_means):
    m = _HOST_RE.match(spec.strip())
    if not m:
        raise ConfigurationError(f"cannot read the host {spec!r}: write HOST, USER@HOST, "
                                 "USER@HOST:PORT (SSHCluster) or HOST:SLOTS (%miniray up)")
    host, user, a, b = m["host"].strip("[]"), m["user"], m["a"], m["b"]
    port, slots = 22, None
    if b is not None:  # HOST:PORT:SLOTS
        port, slots = int(a), int(b)
    elif a is not None:
        if spec.startswith("ssh://") or colon_means == "port":
            port = int(a)
        else:
            slots = int(a)
            if slots > 1024:
                raise ConfigurationError(
                    f"{spec!r}: {slots} slots? In `%miniray up`, HOST:N means N slots; for an "
                    f"SSH port write ssh://{spec} or HOST:PORT:SLOTS")
    return NodeConfig(host, user=user, port=port, slots=slots)


def parse_hosts(specs, slots=None, python=None, gpus=None, env=None):
    """The command-line/magic host syntax: ``HOST``, ``USER@HOST``, ``HOST:SLOTS``,
    ``HOST:PORT:SLOTS`` or ``ssh://USER@HOST:PORT``; returns ``NodeConfig``s.

    >>> [(n.host, n.user, n.port, n.slots) for n in parse_hosts(["gpu1:8", "ssh://me@h:2222"])]
    [('gpu1', None, 22, 8), ('h', 'me', 2222, None)]
    """
    nodes = []
    for spec in specs:
        n = (dataclasses.replace(spec) if isinstance(spec, NodeConfig)
             else node_from_string(spec, "slots"))
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
    from .worker import main

    sys.exit(main(sys.argv[1:]))
