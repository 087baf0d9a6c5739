"""Show a failed item's error in the notebook as IPython shows a local one.

A task's exception comes back with the user's frames as data (``RemoteTraceback.frames``:
file name, line, function). They are rebuilt into a real traceback of frames that "execute"
at those lines (jinja2's trick: code compiled with the frame's file name, padded to its line),
and IPython's own formatter renders it: ``Cell In[5], line 4`` with the cell's source for a
cell, the file and line for a module. The magic's and IPython's frames stay out of it, and the
error says which item failed, on which worker.
"""

from __future__ import annotations

import re
import sys
import types

from miniray.errors import RemoteTraceback
from miniray.tracebacks import short_item

__all__ = ["as_text", "fake_traceback", "for_notebook", "item_error", "rename"]


class _Here(Exception):
    pass


class _Unknown:
    """An argument's value, which stayed on the worker."""

    def __repr__(self):
        return "<on the worker>"


def _frame(filename: str, lineno: int, name: str, first: int = 0,
           params=None) -> types.TracebackType | None:
    """A traceback entry of one frame that runs at ``filename:lineno`` in ``name``: a function
    defined at line ``first`` with ``params``, so that it reads ``in helper(v)``."""
    lineno = max(lineno, 1)
    qualname, name = name, name.rpartition(".")[2]
    here = {"__name__": "__miniray__", "__miniray_here__": _Here()}
    names = [*params[0], params[1], *params[2], params[3]] if params else []
    if params and name.isidentifier() and 1 <= first <= lineno and all(
            p is None or str(p).isidentifier() for p in names):
        pos, varargs, kwonly, varkw = params
        sig = [*pos, f"*{varargs}" if varargs else ("*" if kwonly else None), *kwonly,
               f"**{varkw}" if varkw else None]
        source = ("\n" * (first - 1) + f"def {name}({', '.join(p for p in sig if p)}):"
                  + ("\n" * (lineno - first) + "    " if lineno > first else " ")
                  + "raise __miniray_here__\n")
        run = f"{name}(*__miniray_args__, **__miniray_kwargs__)"
        here.update(__miniray_args__=[_Unknown()] * len(pos),
                    __miniray_kwargs__={k: _Unknown() for k in kwonly})
    else:
        source, run = "\n" * (lineno - 1) + "raise __miniray_here__", None
    try:
        code = compile(source, filename, "exec")
        if run is None:
            code = rename(code, name, qualname)
        exec(code, here)
        if run is not None:
            here[name].__code__ = rename(here[name].__code__, name, qualname)
            exec(run, here)
    except _Here:
        tb = sys.exc_info()[2].tb_next  # (past this function's frame)
        return tb if run is None else tb.tb_next  # (past the code that called the function)
    except Exception:  # (an odd name or file name): the frame is left out
        return None
    return None


def rename(code: types.CodeType, name: str, qualname: str | None = None) -> types.CodeType:
    """``code`` with another name (and qualified name, which Python 3.11+ has)."""
    if hasattr(code, "co_qualname"):
        return code.replace(co_name=name, co_qualname=qualname or name)
    return code.replace(co_name=name)


def fake_traceback(frames) -> types.TracebackType | None:
    """A real traceback whose frames are ``frames`` (``(filename, lineno, name[, firstlineno,
    params])``, outermost first): tools that format tracebacks show them as if they had run
    here."""
    tb = None
    for frame in reversed(list(frames)):
        entry = _frame(*frame)
        if entry is not None:
            tb = types.TracebackType(tb, entry.tb_frame, entry.tb_lasti, entry.tb_lineno)
    return tb


def _stand_in(module: str, qualname: str, message: str, frames) -> BaseException:
    """An exception that shows as the worker's (same name, message and frames)."""
    cls = type(qualname.rpartition(".")[2], (Exception,),
               {"__module__": module, "__qualname__": qualname, "__str__": lambda self: message})
    return cls().with_traceback(fake_traceback(frames))


def _chained(chain):
    """The exception the task's was chained to, rebuilt as stand-ins: ``(exc, how)``."""
    first = how0 = None
    prev = None
    for how, module, qualname, message, frames in chain:
        exc = _stand_in(module, qualname, message, frames)
        if prev is None:
            first, how0 = exc, how
        else:
            _link(prev, exc, how)
        prev = exc
    return first, how0


def _link(exc, inner, how) -> None:
    if how == "cause":
        exc.__cause__, exc.__suppress_context__ = inner, True
    else:
        exc.__cause__, exc.__context__, exc.__suppress_context__ = None, inner, False


def for_notebook(err: BaseException, shell, note: str | None = None) -> BaseException:
    """Make IPython show ``err`` (a task's exception, its ``RemoteTraceback`` chained) with the
    user's frames only (none for miniray's own verdicts, such as a timeout), what it was
    chained to in the task, and ``note`` in place of the engine's "[miniray] raised by ..."
    note. Returns ``err`` (one without a ``__dict__`` cannot take the renderer: it shows as
    Python shows it)."""
    if getattr(err, "_miniray_rendered", False):
        return err
    render = _renderer(err, shell)
    if note is not None:
        notes = getattr(err, "__notes__", None)
        if isinstance(notes, list):
            notes[:] = [n for n in notes if not str(n).startswith("[miniray] raised by")]
            notes.append(note)
        elif notes is None:  # (Python < 3.11: no add_note, but IPython shows __notes__)
            try:
                err.__notes__ = [note]
            except (AttributeError, TypeError):
                pass

    try:
        err._render_traceback_ = render
        err._miniray_rendered = True
    except (AttributeError, TypeError):
        pass
    return err


def _renderer(err: BaseException, shell):
    """A function that formats ``err`` as IPython's ``shell`` shows a local error, with the
    user's frames from its ``RemoteTraceback`` (none for miniray's own verdicts, such as a
    timeout) and what it was chained to in the task."""
    remote = err.__cause__
    if isinstance(remote, RemoteTraceback):
        tb = fake_traceback(remote.frames)
        inner, how = _chained(remote.chain)
    else:  # miniray's own verdict (a timeout, a memory limit, a crash): no frame to show
        tb, inner, how = None, remote, "cause"

    def render():
        saved = err.__cause__, err.__context__, err.__suppress_context__
        err.__cause__, err.__context__, err.__suppress_context__ = None, None, True
        if inner is not None:
            _link(err, inner, how)
        try:
            return shell.InteractiveTB.structured_traceback(type(err), err, tb)
        finally:
            err.__cause__, err.__context__, err.__suppress_context__ = saved

    return render


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def as_text(err: BaseException) -> str | None:
    """``err`` as the notebook shows it (``Cell In[5], line 4`` and the user's lines), in
    plain text for the widget's error table; None outside IPython."""
    try:
        from IPython import get_ipython
    except ImportError:
        return None
    shell = get_ipython()
    if shell is None or getattr(shell, "InteractiveTB", None) is None:
        return None
    try:
        lines = _renderer(err, shell)()
    except Exception:  # a view never breaks on a traceback it cannot draw
        return None
    return _ANSI.sub("", "\n".join(lines)).strip("\n")


def item_error(run, index: int, name: str | None = None, items=()) -> BaseException:
    """Item ``index``'s exception of ``run`` (a ``MapRun``), ready to raise in the notebook:
    the user's frames, and a note ``[miniray] item 3 of 10 (x = 7) failed on worker local-0,
    host h`` (``name``: the map's variable; ``items``: its values, else the worker's repr)."""
    err = run.errors[index]
    value = short_item(items[index]) if index < len(items) else getattr(
        err.__cause__, "argument", None)
    fut = run.futures[index]
    where = ", ".join(p for p in (f"worker {fut.worker}" if fut.worker else "",
                                  f"host {fut.host}" if fut.host else "") if p)
    what = "" if value is None else f" ({name} = {value})" if name else f" ({value})"
    note = (f"[miniray] item {index} of {len(run.futures)}{what} failed"
            + (f" on {where}" if where else ""))
    from IPython import get_ipython

    shell = get_ipython()
    return err if shell is None else for_notebook(err, shell, note)
