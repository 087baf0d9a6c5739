"""A task's traceback as it travels back: the user's frames only, as text and as data.

The task process runs the user's function from inside miniray's own loop, so a raw traceback
starts with frames of ``taskproc.py`` (and of cloudpickle, when a function is rebuilt). Those
leading frames are plumbing: :func:`task_traceback` drops them and keeps the frames from the
user's first one on. Its result is the text (a ``str``, as before) that also carries the frames
as ``(filename, lineno, name)`` tuples, so a client can show them as if they were local (the
notebook face rebuilds them into a real traceback that IPython formats as ``Cell In[5]``).
"""

from __future__ import annotations

import os
import reprlib
import traceback

__all__ = ["TaskTraceback", "task_traceback", "short_item"]

_internal_dirs: tuple = ()

_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = 60
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 6


class TaskTraceback(str):
    """The formatted traceback of a task's exception (the user's frames, its chain too).

    ``frames``: the exception's own frames, outermost first, as ``(filename, lineno, name)``;
    ``chained``: the formatted text of the exception it was raised from or while handling
    (``""`` if none); ``argument``: a short repr of the item it failed on (``None`` if
    unknown).
    """

    frames: tuple = ()
    chained: str = ""
    argument: str | None = None


def task_traceback(exc: BaseException, argument=None, has_argument: bool = False) -> TaskTraceback:
    """``exc``'s traceback without miniray's (and cloudpickle's) frames that lead to the user's
    code. ``argument`` (when ``has_argument``) is the item the task failed on."""
    te = traceback.TracebackException.from_exception(exc)
    _trim(te, set())
    out = TaskTraceback("".join(te.format()))
    out.frames = tuple((f.filename, f.lineno, f.name) for f in te.stack)
    inner = te.__cause__ if te.__cause__ is not None else (
        None if te.__suppress_context__ else te.__context__)
    out.chained = "".join(inner.format()) if inner is not None else ""
    out.argument = short_item(argument) if has_argument else None
    return out


def short_item(value) -> str:
    """A short repr of an item for an error message (bounded in time and length; never
    raises)."""
    try:
        return _repr.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _internal(filename: str) -> bool:
    global _internal_dirs
    if not _internal_dirs:  # (on the first failure: a task process starts without cloudpickle)
        import cloudpickle

        _internal_dirs = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                               for f in (cloudpickle.__file__, __file__))
    return os.path.abspath(filename).startswith(_internal_dirs)


def _trim(te: traceback.TracebackException, seen: set) -> None:
    """Drop the leading internal frames of ``te`` and of every exception in its chain. When no
    frame is the user's (miniray failed before the user's code ran), none is kept: the
    message says what happened."""
    if id(te) in seen:
        return
    seen.add(id(te))
    stack = list(te.stack)
    while stack and _internal(stack[0].filename):
        stack.pop(0)
    te.stack = traceback.StackSummary.from_list(stack)
    for inner in (te.__cause__, te.__context__):
        if inner is not None:
            _trim(inner, seen)
