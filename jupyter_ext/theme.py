"""The colours of the notebook display, as JupyterLab CSS variables with fallbacks.

Everything the views draw (live widget and static snapshot) takes its colours from here, so the
light and dark themes both read well; a page without JupyterLab's variables (GitHub, nbviewer)
gets the light fallbacks.
"""

from __future__ import annotations

__all__ = ["DONE", "FAILED", "CANCELLED", "RUNNING", "TRACK", "PANE", "TEXT", "MUTED", "BORDER",
           "STATE_COLOR", "MONO", "CACHED"]

DONE = "var(--jp-success-color1, #388e3c)"
# done without running (the item cache had it): a paler shade of done, not a blue by running's
CACHED = "var(--jp-success-color2, #66bb6a)"
FAILED = "var(--jp-error-color1, #d32f2f)"
CANCELLED = "var(--jp-warn-color1, #f57c00)"
RUNNING = "var(--jp-brand-color1, #1976d2)"
TRACK = "var(--jp-layout-color3, #bdbdbd)"  # the empty part of a bar or meter
PANE = "var(--jp-layout-color2, #eeeeee)"  # the background of the log pane and tracebacks
TEXT = "var(--jp-content-font-color1, #212121)"
MUTED = "var(--jp-content-font-color2, #616161)"
BORDER = "var(--jp-border-color2, #e0e0e0)"
MONO = "var(--jp-code-font-family, monospace)"

STATE_COLOR = {"running": RUNNING, "done": DONE, "failed": FAILED, "cancelled": CANCELLED,
               "detached": RUNNING}
