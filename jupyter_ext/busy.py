"""Keep JupyterLab's kernel status at "busy" while a blocking map runs in a cell.

JupyterLab (4.4+, "comms over subshells", on by default) answers the first comm a kernel opens
for a target (the map's widget) by asking the kernel for a subshell; the kernel reports that
control request busy, then idle, and JupyterLab shows the whole kernel as idle although the
cell still runs. The kernel is busy with the cell: a blocking map says so again, on the cell's
behalf, about once a second (frontends that track requests see a busy for a request that is
indeed running; nbclient and nbval act on idle only).
"""

from __future__ import annotations

__all__ = ["cell_parent", "say_busy"]


def _kernel():
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    return getattr(get_ipython(), "kernel", None)


def cell_parent():
    """The header of the request the kernel runs now (the cell), or None outside a kernel."""
    kernel = _kernel()
    try:
        return kernel.get_parent("shell").get("header") if kernel is not None else None
    except Exception:
        return None


def say_busy(parent) -> None:
    """Publish ``status: busy`` for the request ``parent`` (a message header). Safe from any
    thread: the kernel's IOPub socket is (ipykernel's display updates go the same way)."""
    kernel = _kernel()
    if kernel is None or not parent or getattr(kernel, "session", None) is None:
        return
    try:
        kernel.session.send(kernel.iopub_socket, "status", {"execution_state": "busy"},
                            parent=parent, ident=kernel._topic("status"))
    except Exception:  # the kernel is shutting down: nothing to tell
        pass
