"""The live view's widget: one ``anywidget.AnyWidget`` whose browser side (``widget.js``,
``widget.css``) draws the HTML parts Python sends and the log pane.

The log pane lives in the browser because the kernel is busy while a blocking map runs and
never sees a click: the per-worker filter, following new lines only while the reader is at the
bottom (else the line they read stays put), and hiding the pane while there is no output all
happen there. The Cancel button (``--bg`` maps) sends ``{"event": "cancel"}`` back to Python.
"""

from __future__ import annotations

import pathlib

import anywidget
import traitlets

__all__ = ["MapWidget"]

_HERE = pathlib.Path(__file__).parent


class MapWidget(anywidget.AnyWidget):
    """Synced state: the HTML parts ``head``, ``lanes``, ``stragglers``, ``errors`` and
    ``timeline`` (one trait each, so an update sends only what changed), ``state``,
    ``cancellable``, ``logs`` (the last lines as ``[seq, worker, text, is_stderr]``),
    ``log_workers`` (for the filter) and ``log_note`` (how many earlier lines are hidden)."""

    _esm = _HERE / "widget.js"
    _css = _HERE / "widget.css"

    head = traitlets.Unicode("").tag(sync=True)
    lanes = traitlets.Unicode("").tag(sync=True)
    stragglers = traitlets.Unicode("").tag(sync=True)
    errors = traitlets.Unicode("").tag(sync=True)
    timeline = traitlets.Unicode("").tag(sync=True)
    state = traitlets.Unicode("running").tag(sync=True)
    cancellable = traitlets.Bool(False).tag(sync=True)
    logs = traitlets.List().tag(sync=True)
    log_workers = traitlets.List(traitlets.Unicode()).tag(sync=True)
    log_note = traitlets.Unicode("").tag(sync=True)
