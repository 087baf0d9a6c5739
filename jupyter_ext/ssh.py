"""``%miniray up``: start an ``SSHCluster`` from the notebook and follow its startup checklist.

The engine owns the checklist (``cluster.status``); this module only renders it: a live
``ipywidgets.HTML`` in a kernel, the checklist's text at the end elsewhere.
"""

from __future__ import annotations

import argparse
import threading
import time

from IPython.core.error import UsageError
from IPython.display import display

import miniray

from .display import widgets_available

__all__ = ["UP_USAGE", "ChecklistView", "up_parser", "start_ssh_cluster"]

UP_USAGE = ("%miniray up HOST ... [-n SLOTS] [--python PATH] [--install] [--timeout S] "
            "[-i FILE] [--known-hosts FILE] [--accept-new-host-keys] [--help]")
_HOSTS_HELP = """\
hosts:
  HOST, USER@HOST                 a host by name or ~/.ssh/config alias
  USER@HOST:PORT, ssh://USER@HOST:PORT
                                  PORT is the SSH port (HOST:N is always a port, never slots)
  HOST=SLOTS, USER@HOST:PORT=SLOTS
                                  that many tasks at once on this host (else -n, else its cores)

examples:
  %miniray up gpu1 gpu2=8 --python /opt/venv/bin/python
  %miniray up me@10.0.0.5:2222 -i ~/.ssh/lab_key --known-hosts ~/lab_known_hosts
"""
_THROTTLE = 0.1  # seconds between widget renders; the last state is always rendered


class _HelpParser(argparse.ArgumentParser):
    """argparse that reports a mistake as UsageError instead of exiting the kernel."""

    def error(self, message):
        raise UsageError(f"{self.prog}: {message}\nusage: {UP_USAGE}\n"
                         "(%miniray up --help explains each option)")


def up_parser() -> argparse.ArgumentParser:
    """The options of ``%miniray up``; ``format_help()`` is what ``--help`` prints."""
    p = _HelpParser(prog="%miniray up", usage=UP_USAGE.replace("%", "%%"), add_help=False,
                    epilog=_HOSTS_HELP,
                    formatter_class=argparse.RawDescriptionHelpFormatter,
                    description="Start miniray workers on SSH hosts (reverse-tunnelled to a "
                    "private server here); %%miniray map runs there until %miniray down.")
    p.add_argument("hosts", nargs="+", metavar="HOST", help="see hosts: below")
    p.add_argument("-n", "--slots", type=int, metavar="SLOTS",
                   help="tasks at once on each host without =SLOTS (default: its cores)")
    p.add_argument("--python", metavar="PATH", help="the Python to run on the hosts "
                   "(default: python3 on their PATH)")
    p.add_argument("--install", action="store_true", help="install this miniray into a venv "
                   "on hosts whose versions differ")
    p.add_argument("--timeout", type=float, default=60.0, metavar="S",
                   help="seconds for each worker to start (default 60)")
    p.add_argument("-i", "--identity", action="append", metavar="FILE",
                   help="a private key to log in with, like ssh -i (repeatable; tried before "
                   "~/.ssh/config's IdentityFile, the agent and ~/.ssh/id_*)")
    p.add_argument("--known-hosts", metavar="FILE", help="the known_hosts file to check host "
                   "keys against, instead of ~/.ssh/known_hosts (like ssh -o "
                   "UserKnownHostsFile=FILE)")
    p.add_argument("--accept-new-host-keys", action="store_true", help="trust a host whose key "
                   "is not known yet and record its key in the known_hosts file (like ssh -o "
                   "StrictHostKeyChecking=accept-new); a changed key is still refused")
    p.add_argument("-h", "--help", action="store_true", help="show this help")
    return p


class ChecklistView:
    """A live ``ipywidgets.HTML`` of a startup ``Checklist``.

    ``on_step`` is the cluster's callback: it runs in the cluster's worker threads, so it only
    sets the ``value`` trait, at most every ``_THROTTLE`` seconds; ``finish`` renders the end.
    """

    def __init__(self):
        import ipywidgets as w

        self.widget = w.HTML()
        self.widget.add_class("miniray-ssh-up")
        self.status = None
        self._lock = threading.Lock()
        self._last = 0.0

    def on_step(self, host, step):
        now = time.monotonic()
        with self._lock:
            if now - self._last < _THROTTLE:
                return
            self._last = now
        self.render()

    def render(self):
        if self.status is not None:
            self.widget.value = self.status._repr_html_()

    def finish(self):
        self.render()

    def _repr_mimebundle_(self, include=None, exclude=None):
        data = self.widget._repr_mimebundle_(include=include, exclude=exclude)
        if isinstance(data, tuple):
            data = data[0]
        data = dict(data or {})
        data["text/plain"] = str(self.status) if self.status is not None else "miniray up"
        return data


def start_ssh_cluster(hosts, *, slots=None, python=None, install=False, timeout=60.0,
                      identity=None, known_hosts=None, accept_new_host_keys=False, kind=None):
    """Start workers on ``hosts``; returns ``(cluster, view)`` (``view`` None for text).

    The checklist (the live widget, or its text printed at the end) shows each host's steps and
    the whole reason of a failure; the ``UsageError`` of a failure then names the failed hosts
    without repeating their reasons. Everything started has been stopped by then.
    """
    __tracebackhide__ = True
    try:
        nodes = miniray.parse_hosts(hosts, slots=slots, python=python)
    except miniray.ConfigurationError as e:
        raise UsageError(f"%miniray up: {e}\nusage: {UP_USAGE}") from None
    if kind is None:
        kind = "widget" if widgets_available() else "text"
    view = ChecklistView() if kind == "widget" else None
    connect_kwargs = {"key_filename": list(identity)} if identity else None
    try:
        cluster = miniray.SSHCluster(nodes, install=install, timeout=timeout, start=False,
                                     connect_kwargs=connect_kwargs, known_hosts=known_hosts,
                                     accept_new_host_keys=accept_new_host_keys,
                                     callback=view.on_step if view is not None else None)
    except miniray.ConfigurationError as e:
        raise UsageError(f"%miniray up: {e}") from None
    if view is not None:
        view.status = cluster.status
        view.render()
        display(view)
    try:
        cluster.start()
    except (miniray.SSHError, miniray.ConfigurationError) as e:
        if view is None:
            print(cluster.status)
        raise UsageError(_failure(cluster.status, e)) from None
    finally:
        if view is not None:
            view.finish()
    if view is None:
        print(cluster.status)
    return cluster, view


def _failure(status, error) -> str:
    """The UsageError of a failed start: the reasons are in the checklist, shown just above."""
    failed = [h.host for h in status.hosts.values() if h.state == "failed"]
    if not failed:  # not a host's failure (e.g. the local server): the error itself
        return f"%miniray up: {error}"
    return (f"%miniray up: {len(failed)} of {len(status.hosts)} host(s) failed "
            f"({', '.join(failed)}): the checklist above says why; nothing was left running")
