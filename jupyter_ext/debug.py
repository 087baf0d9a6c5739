"""``%miniray debug [ITEM]``: re-run a failed item of this kernel's last map here, in the
notebook's own process, and open IPython's post-mortem debugger at the user's failing line.

The item's function and argument are the ones that travelled (``miniray.client.rerun``: the pickled
cell function fetched back from the cluster, the argument unpickled from the payload the
client kept); the debugger's stack starts at the cell's frame, so ``up`` never walks into
miniray or IPython.
"""

from __future__ import annotations

import os
import sys
import traceback

from IPython.core.error import StdinNotImplementedError, UsageError

import miniray
from miniray.client.rerun import prepare_rerun
from miniray.tracebacks import short_item

__all__ = ["DEBUG_USAGE", "debug_item"]

DEBUG_USAGE = "%miniray debug [ITEM]"

_OURS = tuple(os.path.dirname(os.path.abspath(f)) + os.sep for f in (miniray.__file__, __file__))


def debug_item(shell, runs: list, rest: list) -> None:
    """Re-run item ``rest[0]`` (default: the first that failed) of the last of ``runs``
    (``MapRun``s, oldest first) and debug its exception; see the module docstring."""
    if len(rest) > 1 or (rest and not rest[0].isdigit()):
        raise UsageError(f"usage: {DEBUG_USAGE}  (ITEM: the failed item's index in the last "
                         "map, e.g. %miniray debug 3; default: its first failed item)")
    if not runs:
        raise UsageError("%miniray debug: no map has run in this kernel yet; it re-runs a "
                         "failed item of the last %%miniray map")
    run = runs[-1]
    errors = run.errors
    what = f"the last map ({run.name!r}, job {run.job})"
    if rest:
        index = int(rest[0])
        if index >= len(run.futures):
            raise UsageError(f"%miniray debug: {what} has {len(run.futures)} item(s), "
                             f"0 to {len(run.futures) - 1}; there is no item {index}")
        if index not in errors:
            fut = run.futures[index]
            state = ("was cancelled" if fut.cancelled() else "has not finished yet"
                     if not fut.done() else "did not fail")
            raise UsageError(f"%miniray debug: item {index} of {what} {state}; "
                             + _failed_list(errors))
    elif errors:
        index = min(errors)
    else:
        still = "" if run.done() else " yet (it is still running)"
        raise UsageError(f"%miniray debug: no item of {what} failed{still}; nothing to debug")
    fut = run.futures[index]
    try:
        fn, args, kwargs = prepare_rerun(fut)
    except miniray.RerunError as e:
        raise UsageError(f"%miniray debug: {e}") from None
    except miniray.ServerError as e:
        raise UsageError(f"%miniray debug: {e}") from None
    name = run.item_name or "item"
    arg = args[0] if len(args) == 1 and not kwargs else (args, kwargs)
    print(f"miniray: re-running item {index} of job {run.name!r} ({run.job}) here, with "
          f"{name} = {short_item(arg)}")
    err = errors[index]
    if isinstance(err, (miniray.TaskTimeoutError, miniray.MemoryLimitError)):
        print(f"miniray: it failed with {type(err).__name__} on its worker; no such limit "
              "applies here (interrupt the kernel to stop it)")
    try:
        value = fn(*args, **kwargs)
    except Exception as e:
        _post_mortem(shell, e)
        return
    print(f"miniray: item {index} did not fail here: it returned {short_item(value)}. Its "
          f"failure on the worker ({type(err).__name__}: {short_item(str(err))}) depends on "
          "where it ran: the worker's limits, environment, GPUs or files")


def _failed_list(errors: dict) -> str:
    if not errors:
        return "no item of it failed"
    shown = ", ".join(map(str, sorted(errors)[:10])) + (", ..." if len(errors) > 10 else "")
    return f"the failed item(s): {shown}"


def _user_tb(tb):
    """``tb`` from the first frame that is neither miniray's nor this package's."""
    while tb is not None and os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_OURS):
        tb = tb.tb_next
    return tb


def _post_mortem(shell, exc: BaseException) -> None:
    """Open ``shell``'s debugger on ``exc`` at its innermost frame (as ``%debug`` does), its
    stack starting at the user's first frame; ``%debug`` later reopens it."""
    from IPython.core.display_trap import DisplayTrap

    tb = _user_tb(exc.__traceback__) or exc.__traceback__
    exc.__traceback__ = tb
    sys.last_type, sys.last_value, sys.last_traceback = type(exc), exc, tb
    if sys.version_info >= (3, 12):
        sys.last_exc = exc
    print("".join(traceback.format_exception_only(type(exc), exc)).rstrip())
    pdb = shell.debugger_cls()
    with DisplayTrap(hook=sys.__displayhook__):  # (as IPython's own %debug)
        pdb.reset()
        pdb.botframe = tb.tb_frame
        try:
            pdb.interaction(None, exc)  # (its traceback is ``tb``; its chain is browsable)
        except StdinNotImplementedError:
            raise UsageError(
                "%miniray debug: this frontend does not answer input requests, so the "
                "debugger cannot run here; the item's exception is kept: %debug opens it in "
                "a frontend that does (JupyterLab, Notebook, jupyter console)") from None
