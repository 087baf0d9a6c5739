"""``%miniray up``: start an ``SSHCluster`` from the notebook and follow its startup checklist.

The engine owns the checklist (``cluster.status``); this module only renders it: a live
``ipywidgets.HTML`` in a kernel, the checklist's text at the end elsewhere.
"""

from __future__ import annotations

import threading
import time

from IPython.core.error import UsageError
from IPython.display import display

import miniray

from .display import widgets_available

__all__ = ["UP_USAGE", "ChecklistView", "start_ssh_cluster"]

UP_USAGE = "%miniray up HOST[:SLOTS] ... [--python PATH] [--install] [--slots N] [--timeout S]"
_THROTTLE = 0.1  # seconds between widget renders; the last state is always rendered


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
                      kind=None):
    """Start workers on ``hosts``; returns ``(cluster, view)`` (``view`` None for text).

    A failure raises ``UsageError`` whose message names each host, the reason and the fix,
    followed by the checklist; everything started has been stopped by then.
    """
    __tracebackhide__ = True
    try:
        nodes = miniray.parse_hosts(hosts, slots=slots, python=python)
    except miniray.ConfigurationError as e:
        raise UsageError(f"%miniray up: {e}\nusage: {UP_USAGE}") from None
    if kind is None:
        kind = "widget" if widgets_available() else "text"
    view = ChecklistView() if kind == "widget" else None
    try:
        cluster = miniray.SSHCluster(nodes, install=install, timeout=timeout, start=False,
                                     callback=view.on_step if view is not None else None)
    except miniray.ConfigurationError as e:
        raise UsageError(f"%miniray up: {e}") from None
    if view is not None:
        view.status = cluster.status
        view.render()
        display(view)
    try:
        cluster.start()
    except miniray.SSHError as e:
        raise UsageError(f"%miniray up: {e}\n\n{cluster.status}") from None
    except miniray.ConfigurationError as e:
        raise UsageError(f"%miniray up: {e}") from None
    finally:
        if view is not None:
            view.finish()
    if view is None:
        print(cluster.status)
    return cluster, view
