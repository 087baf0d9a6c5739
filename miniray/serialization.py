"""How functions, arguments and results are pickled: cloudpickle, protocol 5, out-of-band buffers.

Functions are pickled once and stored by content hash. Functions from ``__main__``, notebook
cells, lambdas and closures travel by value (cloudpickle does that). Modules imported from next
to the caller's script or notebook, rather than installed, are registered to travel by value
too, so a worker that lacks the file still runs the task. Code objects keep their file name
(cloudpickle writes ``<dynamic-code>``), so a task's traceback names the notebook cell or file
its frames come from.
"""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import sys
import sysconfig
import types
from collections import ChainMap

import cloudpickle

from .errors import SerializationError

__all__ = ["dumps", "dumps_call", "loads", "dumps_function", "OOB_THRESHOLD"]

#: Buffers at least this large travel out of band (no copy into the pickle stream).
OOB_THRESHOLD = 64 * 1024

_INSTALLED_PREFIXES = None
_BY_VALUE_DONE: set[str] = set()


def dumps(obj, what: str = "value") -> list:
    """Pickle ``obj`` into frames: the pickle stream, then its large buffers as memoryviews."""
    buffers: list = []

    def keep(buf: pickle.PickleBuffer):
        raw = buf.raw() if _contiguous(buf) else None
        if raw is None or raw.nbytes < OOB_THRESHOLD:
            return True  # small or strided: in band
        buffers.append(raw)
        return False

    try:
        head = _cloudpickle(obj, buffer_callback=keep)
    except Exception as e:
        raise SerializationError(
            f"cannot pickle {_culprit(obj, what)}: {type(e).__name__}: {e}. "
            "Everything a task takes or returns travels between processes with cloudpickle; "
            "pass plain data, or create the object inside the task."
        ) from e
    return [head, *buffers]


def _culprit(obj, what: str) -> str:
    """What in ``obj`` cannot be pickled: for a call's or a map chunk's arguments (tagged as
    ``dumps_call`` and ``Executor.map`` tag them), the argument or item itself."""
    if what == "arguments" and type(obj) is tuple and obj and obj[0] in ("s", "m", "m1", "mt",
                                                                         "m1t"):
        if obj[0] == "s":
            _, args, kwargs = obj
            named = [(f"argument {i}", a) for i, a in enumerate(args)] + [
                (f"keyword argument {k}=", v) for k, v in kwargs.items()]
        else:
            named = [("the item" if obj[0] in ("m1", "m1t") else "the arguments", v)
                     for v in obj[1]]
        for name, value in named:
            try:
                _cloudpickle(value, buffer_callback=lambda b: False)
            except Exception:
                return f"{name} {_short(value)}"
    return f"the {what} {_short(obj)}"


def dumps_call(args: tuple, kwargs: dict) -> list:
    """A submit's frames: builtin-scalar arguments go through the C pickler alone (it pickles
    them exactly as cloudpickle does, several times faster: cloudpickle's Python-level setup
    dominates for small calls); anything else through ``dumps``."""
    if _is_plain(args) and (not kwargs or _is_plain(kwargs.values())):
        return [pickle.dumps(("s", args, kwargs), protocol=5)]
    return dumps(("s", args, kwargs), what="arguments")


_SCALARS = frozenset((int, float, complex, str, bytes, bool, type(None)))


def _is_plain(values) -> bool:
    """True when ``values`` are builtin scalars, or short tuples/lists of them."""
    for v in values:
        t = type(v)
        if t in _SCALARS:
            continue
        if (t is tuple or t is list) and len(v) <= 16 and all(type(x) in _SCALARS for x in v):
            continue
        return False
    return True


def loads(frames):
    head, *buffers = frames
    return pickle.loads(head, buffers=buffers)


def _contiguous(buf: pickle.PickleBuffer) -> bool:
    try:
        buf.raw()
        return True
    except BufferError:
        return False


def short_repr(obj, limit: int = 80) -> str:
    """``repr(obj)`` cut to ``limit`` characters, for error messages (never raises)."""
    try:
        text = repr(obj)
    except Exception:
        text = f"<{type(obj).__name__}>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_short = short_repr


def dumps_function(fn) -> tuple[str, bytes]:
    """Pickle a task function by value where needed; return (sha256 hex, bytes)."""
    if not callable(fn):
        raise SerializationError(
            f"{_short(fn)} is not callable; submit() and map() take a function first"
        )
    _register_local_modules(fn)
    try:
        data = _cloudpickle(fn)
    except Exception as e:
        culprit = _captured_culprit(fn)
        raise SerializationError(
            f"cannot pickle the function {_short(fn)}"
            + (f": it uses {culprit}" if culprit else "") + f" ({type(e).__name__}: {e}). "
            "It probably closes over something that cannot travel (a lock, an open file, a "
            "connection); create that inside the function instead."
        ) from e
    return hashlib.sha256(data).hexdigest(), data


def _captured_culprit(fn) -> str | None:
    """The name and type of what ``fn`` closes over or reads from its globals that cannot be
    pickled (the likely reason the function cannot be)."""
    code, glb = getattr(fn, "__code__", None), getattr(fn, "__globals__", None)
    if code is None or glb is None:
        return None
    names = list(zip(code.co_freevars, fn.__closure__ or ()))
    names = [(n, c.cell_contents) for n, c in names if _has_contents(c)]
    names += [(n, glb[n]) for n in sorted(_code_names(code)) if n in glb]
    for name, value in names:
        if isinstance(value, types.ModuleType):
            continue
        try:
            _cloudpickle(value, buffer_callback=lambda b: False)
        except Exception:
            return f"`{name}` (a {type(value).__module__}.{type(value).__qualname__})"
    return None


def _has_contents(cell) -> bool:
    try:
        cell.cell_contents
        return True
    except ValueError:
        return False


def _installed_prefixes() -> tuple:
    global _INSTALLED_PREFIXES
    if _INSTALLED_PREFIXES is None:
        paths = set()
        for scheme_key in ("stdlib", "platstdlib", "purelib", "platlib"):
            p = sysconfig.get_paths().get(scheme_key)
            if p:
                paths.add(os.path.realpath(p))
        for p in sys.path:
            if "site-packages" in p or "dist-packages" in p:
                paths.add(os.path.realpath(p))
        paths.add(os.path.realpath(sys.base_prefix))
        paths.add(os.path.realpath(sys.prefix))
        _INSTALLED_PREFIXES = tuple(sorted(paths))
    return _INSTALLED_PREFIXES


def _is_local_module(mod: types.ModuleType) -> bool:
    name = getattr(mod, "__name__", "")
    if not name or name == "__main__" or name.split(".")[0] in ("miniray", "jupyter_ext"):
        return False
    path = getattr(mod, "__file__", None)
    if not path:
        return False
    real = os.path.realpath(path)
    return not any(real.startswith(p + os.sep) for p in _installed_prefixes())


def _register_local_modules(fn, depth: int = 3) -> None:
    """Register modules next to the caller (not installed) to be pickled by value."""
    seen: set[int] = set()

    def visit(obj, d):
        if id(obj) in seen or d < 0:
            return
        seen.add(id(obj))
        if isinstance(obj, types.ModuleType):
            mods = [obj]
        else:
            modname = getattr(obj, "__module__", None)
            mod = sys.modules.get(modname) if isinstance(modname, str) else None
            mods = [mod] if mod is not None else []
        for mod in mods:
            if mod.__name__ in _BY_VALUE_DONE or not _is_local_module(mod):
                continue
            top = mod.__name__.split(".")[0]
            target = sys.modules.get(top, mod)
            try:
                cloudpickle.register_pickle_by_value(target)
            except ValueError:
                cloudpickle.register_pickle_by_value(mod)
            _BY_VALUE_DONE.add(mod.__name__)
        code = getattr(obj, "__code__", None)
        glb = getattr(obj, "__globals__", None)
        if code is not None and glb is not None:
            for name in _code_names(code):
                if name in glb:
                    visit(glb[name], d - 1)
        for cell in getattr(obj, "__closure__", None) or ():
            try:
                visit(cell.cell_contents, d - 1)
            except ValueError:
                pass
        inner = getattr(obj, "func", None)  # functools.partial
        if inner is not None:
            visit(inner, d - 1)

    visit(fn, depth)


def _code_names(code) -> set:
    names = set(code.co_names)
    for const in code.co_consts:
        if isinstance(const, types.CodeType):
            names |= _code_names(const)
    return names


def _code_reduce(code: types.CodeType):
    """cloudpickle's reduction of a code object, with its real ``co_filename``."""
    make, args = cloudpickle.cloudpickle._code_reduce(code)
    return make, tuple(code.co_filename if a == "<dynamic-code>" else a for a in args)


class _Pickler(cloudpickle.Pickler):
    if hasattr(cloudpickle.cloudpickle, "_code_reduce"):  # (else: cloudpickle's own names)
        dispatch_table = ChainMap({types.CodeType: _code_reduce},
                                  cloudpickle.Pickler.dispatch_table)


def _cloudpickle(obj, buffer_callback=None) -> bytes:
    with io.BytesIO() as f:
        _Pickler(f, protocol=5, buffer_callback=buffer_callback).dump(obj)
        return f.getvalue()
