"""The per-host startup checklist of an ``SSHCluster``: which step each host reached, when, why not.

A plain value object (text repr for terminals and nbval, HTML for notebooks) plus a callback
hook so a live widget can follow along; it knows nothing of widgets itself.
"""

from __future__ import annotations

import html
import logging
import threading
import time
from dataclasses import dataclass, field

__all__ = ["STEPS", "Step", "HostStatus", "Checklist"]

log = logging.getLogger("miniray.sshcluster")

STEPS = ("connected", "checked", "installed", "tunnelled", "started", "first heartbeat")
_MARK = {"pending": " ", "running": "~", "ok": "x", "failed": "!", "skipped": "-"}
_COLOR = {"ok": "#2e7d32", "failed": "#c62828", "running": "#f9a825", "pending": "#9e9e9e",
          "skipped": "#9e9e9e"}


@dataclass
class Step:
    name: str
    state: str = "pending"  # pending, running, ok, failed, skipped
    seconds: float | None = None  # time the step took, once it ended
    detail: str = ""  # e.g. "Python 3.11.7, cloudpickle 3.1.2" or the failure reason
    started: float | None = field(default=None, repr=False)


@dataclass
class HostStatus:
    """One host's progress through STEPS; ``error`` is the exception that stopped it."""

    host: str
    steps: dict = field(default_factory=lambda: {s: Step(s) for s in STEPS})
    error: BaseException | None = None
    worker: str | None = None  # the worker's name in the cluster once started
    stopped: bool = False  # the startup failed elsewhere and this host was stopped with it

    @property
    def state(self) -> str:
        if self.error is not None or any(s.state == "failed" for s in self.steps.values()):
            return "failed"
        if self.stopped:
            return "stopped"
        if all(s.state in ("ok", "skipped") for s in self.steps.values()):
            return "ready"
        return "starting"

    @property
    def reason(self) -> str:
        for s in self.steps.values():
            if s.state == "failed":
                return f"{s.name}: {s.detail}"
        return ""


class Checklist:
    """Startup progress of every host. ``callback(host, step)`` runs on each change.

    ``print(cluster.status)`` gives one line per host; in a notebook it renders as a table.
    """

    def __init__(self, hosts, callback=None):
        self.hosts = {h: HostStatus(h) for h in hosts}
        self.callback = callback
        self._lock = threading.Lock()

    def begin(self, host, step):
        self._set(host, step, "running", None)

    def done(self, host, step, detail=""):
        self._set(host, step, "ok", detail)

    def skip(self, host, step, detail=""):
        self._set(host, step, "skipped", detail)

    def fail(self, host, step, error):
        with self._lock:
            self.hosts[host].error = error
        self._set(host, step, "failed", str(error))  # all of it: the fix is often last

    def _set(self, host, name, state, detail):
        now = time.monotonic()
        with self._lock:
            step = self.hosts[host].steps[name]
            if state == "running":
                step.started = now
            elif step.started is not None:
                step.seconds = now - step.started
            step.state = state
            if detail is not None:
                step.detail = detail
        if self.callback is not None:
            try:
                self.callback(host, step)
            except Exception:  # a watcher's bug must not break startup
                log.exception("SSHCluster status callback failed")

    def stop(self):
        """The startup failed: hosts that did not fail were stopped with it (state "stopped")."""
        with self._lock:
            for h in self.hosts.values():
                h.stopped = True

    def running_step(self, host):
        """The step ``host`` is on now (to mark it failed), else the first pending one."""
        steps = self.hosts[host].steps.values()
        for state in ("running", "pending"):
            for s in steps:
                if s.state == state:
                    return s.name
        return STEPS[-1]

    @property
    def ready(self) -> bool:
        return all(h.state == "ready" for h in self.hosts.values())

    # -- display -----------------------------------------------------------------------------
    def __str__(self) -> str:
        width = max([len(h) for h in self.hosts] + [4])
        lines = []
        for h in self.hosts.values():
            cells = []
            for s in h.steps.values():
                t = f" {s.seconds:.1f}s" if s.seconds is not None and s.state == "ok" else ""
                cells.append(f"[{_MARK[s.state]}] {s.name}{t}")
            line = f"{h.host:<{width}}  {h.state:<8}  " + "  ".join(cells)
            if h.reason:  # every line of it, indented under the host
                pad = " " * (width + 5)
                line += f"\n{'':<{width}}  -> " + h.reason.replace("\n", "\n" + pad)
            lines.append(line)
        return "\n".join(lines) or "(no hosts)"

    def __repr__(self) -> str:
        return f"<miniray SSH startup\n{self}\n>"

    def _repr_pretty_(self, p, cycle):
        p.text(str(self))

    def _repr_html_(self) -> str:
        head = "".join(f"<th>{html.escape(s)}</th>" for s in STEPS)
        rows = []
        for h in self.hosts.values():
            cells = []
            for s in h.steps.values():
                t = f" {s.seconds:.1f}s" if s.seconds is not None else ""
                # a failed step's detail is the reason row below: not twice
                tip = "" if s.state == "failed" else html.escape(s.detail, quote=True)
                cells.append(f'<td title="{tip}" style="color:{_COLOR[s.state]}">'
                             f"{html.escape(s.state)}{t}</td>")
            reason = (f'<tr><td></td><td colspan="{len(STEPS)}" style="color:#c62828; '
                      f'white-space:pre-wrap; text-align:left">{html.escape(h.reason)}</td></tr>'
                      if h.reason else "")
            note = (f' <span style="color:{_COLOR["skipped"]}">(stopped)</span>'
                    if h.state == "stopped" else "")
            rows.append(f"<tr><td><b>{html.escape(h.host)}</b>{note}</td>{''.join(cells)}</tr>"
                        f"{reason}")
        return (f"<table><thead><tr><th>host</th>{head}</tr></thead>"
                f"<tbody>{''.join(rows)}</tbody></table>")

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": str(self), "text/html": self._repr_html_()}
