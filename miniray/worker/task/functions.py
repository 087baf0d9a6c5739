"""The task process's functions: pickled ones by hash, loaded ones, and jobs' initializers.

A job's function travels once per process (``fn:{sha}`` in Redis, or sent by the worker) and
is unpickled once (``function``). A job with an initializer runs it once in the process
(``initialize``); when the initializer set globals and the function travelled by value (a
notebook's: it has globals of its own), the job gets a copy of the function whose globals
have them too, as ``ProcessPoolExecutor``'s tasks see what their initializer set.
"""

from __future__ import annotations

import functools
import pickle
import sys
import time
import types

from miniray.tracebacks import task_traceback
from miniray.worker.jobspec import bad_payload

from .run import portable_exc, short

__all__ = ["Functions"]


class Functions:
    """What this process knows of the jobs' functions (see the module's docstring)."""

    def __init__(self):
        self.pickled: dict = {}  # sha -> pickled function
        self.loaded: dict = {}  # sha (or (job, sha), see function) -> function
        self.init_names: dict = {}  # job -> globals its initializer set
        self.initialized: dict = {}  # job -> None, or the initializer's failure

    def function(self, sha: str, group=None):
        """The task function; for a job whose initializer set globals, a copy of its own
        whose globals (shared with the helpers pickled with it) have them too."""
        names = self.init_names.get(group) if group is not None else None
        key = (group, sha) if names else sha
        fn = self.loaded.get(key)
        if fn is None:
            fn = self.loaded[key] = _load_function(group, sha, self.pickled[sha])
            g = _by_value_globals(fn) if names else None
            if g is not None:
                g.update(names)
        return fn

    def initialize(self, group, init, leftovers) -> None:
        """Run the job's initializer once in this process; remember how it went, and the
        globals it set: a function sent by value has globals of its own, and without them
        the job's tasks would not see what the initializer loaded (ProcessPoolExecutor's
        tasks do; so must ours)."""
        if group in self.initialized:
            return
        try:
            fn = _load_function(group, init, self.pickled[init])  # own globals, fresh
            g = _function_globals(fn)
            before = dict(g) if g is not None else {}
            leftovers.settle()  # (what earlier chunks left is not the initializer's)
            fn()
            # what the initializer starts (a model server, a pool) serves the job's tasks in
            # this process: it is kept, as with ProcessPoolExecutor, until the process ends
            leftovers.look(True, time.monotonic())
            if g is not None:
                names = {k: v for k, v in g.items() if k not in before or before[k] is not v}
                if names:
                    self.init_names[group] = names
            self.initialized[group] = None
        except BaseException as e:
            from miniray.errors import InitializerError

            err = InitializerError(
                f"the executor's initializer raised {type(e).__name__}: {short(e)}, so no "
                "task of this job can run in this process; fix the initializer and submit "
                "again (its traceback is chained below)")
            self.initialized[group] = portable_exc(err, task_traceback(e))

    def fetch(self, works, redis, fn_key) -> None:
        """Read the functions (and initializers) ``works`` need from Redis; one that is gone
        fails its chunk with an error that says so."""
        need = set()
        for w in works:
            for sha in (w.sha, w.spec.get("init")):
                if sha and sha not in self.pickled:
                    need.add(sha)
        if not need:
            return
        need = sorted(need)
        got = redis(lambda pipe: pipe.command("MGET", *[fn_key(s) for s in need]))
        for sha, data in zip(need, got[0] if got else [None] * len(need)):
            if data is not None:
                self.pickled[sha] = data
        for w in works:
            if w.missing is None and any(sha and sha not in self.pickled
                                         for sha in (w.sha, w.spec.get("init"))):
                from miniray.errors import MinirayError

                w.missing = MinirayError(
                    f"the function of job {w.job} is no longer in Redis (it expired after "
                    "MINIRAY_FUNCTION_TTL_SECONDS or the server restarted); submit again")


def _load_function(job, sha, data):
    try:
        return pickle.loads(data)
    except ImportError:  # a module the worker lacks: the user's error, as it is
        raise
    except Exception as e:
        raise bad_payload(job, f"its function (fn:{sha[:12]}...)", e) from e


def _function_globals(fn):
    """The globals dict of a Python function (or of the one a partial wraps), else None."""
    if isinstance(fn, functools.partial):
        fn = fn.func
    return fn.__globals__ if isinstance(fn, types.FunctionType) else None


def _by_value_globals(fn):
    """The globals dict of a function that travelled by value (a notebook's, or a module's
    next to the caller's), else None: a module's real namespace needs no help."""
    if isinstance(fn, functools.partial):
        fn = fn.func
    g = _function_globals(fn)
    module = sys.modules.get(fn.__module__) if g is not None else None
    return None if g is None or (module is not None and vars(module) is g) else g
