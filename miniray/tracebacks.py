"""A task's traceback as it travels back: the user's frames only, as text and as data.

The task process runs the user's function from inside miniray's own loop, so a raw traceback
starts with frames of ``worker/task/run.py`` (and of cloudpickle, when a function is rebuilt). Those
leading frames are plumbing: :func:`task_traceback` drops them and keeps the frames from the
user's first one on. Its result is the text (a ``str``, as before) that also carries the frames
as data, and the exceptions the task's exception was chained to, so a client can show them as
if they had run there (the notebook face rebuilds them into real tracebacks that IPython
formats as ``Cell In[5], line 4``).

A frame is ``(filename, lineno, name, firstlineno, params)``: ``name`` is its function's
qualified name (``Model.predict``), ``firstlineno`` where the function starts, ``params`` is ``(positional, varargs, keyword_only, varkw)`` of its parameter
names (``None`` for no ``*``/``**``).
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

    ``frames``: the exception's own frames, outermost first; ``chain``: what it was raised
    from (``"cause"``) or while handling (``"context"``), then what that one was, and so on,
    as ``(how, module, qualname, message, frames)``; ``argument``: a short repr of the item the
    task failed on (``None`` if unknown).
    """

    frames: tuple = ()
    chain: tuple = ()
    argument: str | None = None


def task_traceback(exc: BaseException, argument=None, has_argument: bool = False) -> TaskTraceback:
    """``exc``'s traceback without miniray's (and cloudpickle's) frames that lead to the user's
    code. ``argument`` (when ``has_argument``) is the item the task failed on."""
    te = traceback.TracebackException.from_exception(exc)
    _trim(te, set())
    out = TaskTraceback("".join(te.format()))
    out.frames = _frames(exc)
    chain, seen, e = [], {id(exc)}, exc
    while True:
        how, e = ("cause", e.__cause__) if e.__cause__ is not None else (
            "context", None if e.__suppress_context__ else e.__context__)
        if e is None or id(e) in seen:
            break
        seen.add(id(e))
        t = type(e)
        chain.append((how, t.__module__, t.__qualname__, _str(e), _frames(e)))
    out.chain = tuple(chain)
    out.argument = short_item(argument) if has_argument else None
    return out


def short_item(value) -> str:
    """A short repr of an item for an error message (bounded in time and length; never
    raises)."""
    try:
        return _repr.repr(value)
    except Exception:
        return f"<{type(value).__name__}>"


def _str(e: BaseException) -> str:
    try:
        return str(e)
    except Exception:
        return f"<{type(e).__name__}: str() failed>"


def _internal(filename: str) -> bool:
    global _internal_dirs
    if not _internal_dirs:  # (on the first failure: a task process starts without cloudpickle)
        import cloudpickle

        _internal_dirs = tuple(os.path.dirname(os.path.abspath(f)) + os.sep
                               for f in (cloudpickle.__file__, __file__))
    return os.path.abspath(filename).startswith(_internal_dirs)


def _frames(exc: BaseException) -> tuple:
    frames = [(f.f_code, lineno) for f, lineno in traceback.walk_tb(exc.__traceback__)]
    while frames and _internal(frames[0][0].co_filename):
        frames.pop(0)
    return tuple((code.co_filename, lineno, getattr(code, "co_qualname", code.co_name),
                  code.co_firstlineno, _params(code))
                 for code, lineno in frames)


def _params(code) -> tuple:
    names, n = code.co_varnames, code.co_argcount
    kw = code.co_kwonlyargcount
    i = n + kw
    varargs = varkw = None
    if code.co_flags & 0x04:  # CO_VARARGS
        varargs, i = names[i], i + 1
    if code.co_flags & 0x08:  # CO_VARKEYWORDS
        varkw = names[i]
    return names[:n], varargs, names[n:n + kw], varkw


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
