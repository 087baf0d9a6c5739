"""Show a failed item's error in the notebook as IPython shows a local one.

A task's exception comes back with the user's frames as data (``RemoteTraceback.frames``:
file name, line, function). They are rebuilt into a real traceback of frames that "execute"
at those lines (jinja2's trick: code compiled with the frame's file name, padded to its line),
and IPython's own formatter renders it: ``Cell In[5], line 4`` with the cell's source for a
cell, the file and line for a module. The magic's and IPython's frames stay out of it, and the
error says which item failed, on which worker.
"""

from __future__ import annotations

import sys
import types

from miniray.errors import RemoteTraceback
from miniray.tracebacks import short_item

__all__ = ["fake_traceback", "for_notebook", "item_note"]


class _Here(Exception):
    pass


def _frame(filename: str, lineno: int, name: str) -> types.TracebackType | None:
    """A traceback entry of one frame that runs at ``filename:lineno`` in ``name``."""
    code = compile("\n" * (max(lineno, 1) - 1) + "raise __miniray_here__", filename, "exec")
    code = code.replace(co_name=name, co_qualname=name)
    try:
        exec(code, {"__name__": "__miniray__", "__miniray_here__": _Here()})
    except _Here:
        return sys.exc_info()[2].tb_next  # (its first entry is this function's frame)
    return None


def fake_traceback(frames) -> types.TracebackType | None:
    """A real traceback whose frames are ``frames`` (``(filename, lineno, name)``, outermost
    first): tools that format tracebacks show them as if they had run here."""
    tb = None
    for filename, lineno, name in reversed(list(frames)):
        entry = _frame(filename, lineno, name)
        if entry is not None:
            tb = types.TracebackType(tb, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return tb


def for_notebook(err: BaseException, shell, note: str | None = None) -> BaseException:
    """Make IPython show ``err`` (a task's exception, its ``RemoteTraceback`` chained) with the
    user's frames only (none for miniray's own verdicts, such as a timeout), what it was
    chained to in the task, and ``note`` in place of the engine's "[miniray] raised by ..."
    note. Returns ``err``; one that cannot take the
    renderer (no ``__dict__``) is left as it is."""
    if getattr(err, "_miniray_rendered", False):
        return err
    remote = err.__cause__
    if isinstance(remote, RemoteTraceback):
        tb = fake_traceback(remote.frames)
        chained = RemoteTraceback(remote.chained) if remote.chained else None
    else:  # miniray's own verdict (a timeout, a memory limit, a crash): no frame to show
        tb, chained = None, remote
    if note is not None:
        notes = getattr(err, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [n for n in notes if not str(n).startswith("[miniray] raised by")]
            notes.append(note)

    def render():
        saved = err.__cause__, err.__context__, err.__suppress_context__
        err.__cause__, err.__context__, err.__suppress_context__ = chained, None, True
        try:
            return shell.InteractiveTB.structured_traceback(type(err), err, tb)
        finally:
            err.__cause__, err.__context__, err.__suppress_context__ = saved

    try:
        err._render_traceback_ = render
        err._miniray_rendered = True
    except (AttributeError, TypeError):
        pass
    return err


def item_note(run, index: int, name: str, items) -> str:
    """``[miniray] item 3 of 10 (x = 7) failed on worker local-0, host h``."""
    value = short_item(items[index]) if index < len(items) else getattr(
        getattr(run.errors.get(index), "__cause__", None), "argument", None)
    fut = run.futures[index]
    where = ", ".join(p for p in (f"worker {fut.worker}" if fut.worker else "",
                                  f"host {fut.host}" if fut.host else "") if p)
    return (f"[miniray] item {index} of {len(run.futures)}"
            + (f" ({name} = {value})" if value is not None else "")
            + " failed" + (f" on {where}" if where else ""))
