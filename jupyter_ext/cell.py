"""Turn a ``%%miniray map`` cell body into a picklable function of one item.

The body becomes ``def cell(NAME): ...`` whose last expression statement is returned (the
value a cell would display). The names it reads from the notebook are copied into a fresh
globals dict, so cloudpickle ships exactly those: modules by reference, functions and
classes defined in the notebook (``__main__``) by value. Its code carries the file name
IPython gave the cell and the cell's own line numbers, so a task's traceback reads
``Cell In[5], line 4`` (see ``cell_filename``).
"""

from __future__ import annotations

import ast
import builtins
import io
import sys
import types

import cloudpickle
from IPython.core.error import UsageError

from .tracebacks import rename

__all__ = ["cell_filename", "check_items", "check_sendable", "compile_cell", "free_names"]

_FN = "__miniray_cell__"


def free_names(tree: ast.AST) -> set[str]:
    """Every name the code reads (a superset of its globals: locals are filtered later)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Load):
            names.add(node.id)
        elif isinstance(node, (ast.Global, ast.Nonlocal)):
            names.update(node.names)
    return names


def cell_filename(shell, line: str, body: str) -> str:
    """The file name of the running ``%%miniray`` cell as IPython knows it, with the cell's
    text in ``linecache``: a traceback through it reads ``Cell In[N], line L`` and shows the
    line. (IPython cached the cell as the magic call it was transformed into.)"""
    raw = f"%%miniray {line}\n{body}"
    try:
        return shell.compile.cache(raw, _cell_number(shell), raw_code=raw)
    except Exception:  # not IPython's caching compiler: tracebacks just name the file
        return "<miniray map cell>"


def _cell_number(shell) -> int:
    """The running cell's execution count: that of the cell code that called the magic (the
    shell's counter already points at the next cell), else the shell's counter."""
    known = getattr(shell.compile, "_filename_map", {})
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_code.co_filename in known:
            return known[frame.f_code.co_filename]
        frame = frame.f_back
    return shell.execution_count


def compile_cell(body: str, arg: str, user_ns: dict, filename: str = "<miniray map cell>",
                 first_line: int = 1):
    """The function ``arg -> value of the body's last expression``, with its names captured;
    its code says it comes from ``filename``, the body starting at line ``first_line``.

    >>> f = compile_cell("y = x * k\\ny + 1", "x", {"k": 10})
    >>> f(2)
    21
    """
    if not arg.isidentifier():
        raise UsageError(f"%%miniray map: {arg!r} is not a valid variable name")
    try:
        tree = ast.parse(body, filename=filename, mode="exec")
    except SyntaxError as e:
        where = f"line {(e.lineno or 1) + first_line - 1}" + (
            f", column {e.offset}" if e.offset else "")
        text = (e.text or "").rstrip()
        raise UsageError(f"%%miniray map: syntax error in the cell body at {where}: {e.msg}"
                         + (f"\n    {text}" if text else "")) from None
    ast.increment_lineno(tree, first_line - 1)
    stmts = tree.body or [ast.Pass()]
    last = stmts[-1]
    if isinstance(last, ast.Expr):
        stmts[-1] = ast.copy_location(ast.Return(value=last.value), last)
    module = ast.parse(f"def {_FN}({arg}):\n    pass\n")
    module.body[0].body = stmts
    module = ast.fix_missing_locations(module)
    try:
        code = compile(module, filename, "exec")
    except SyntaxError as e:  # e.g. 'return' outside function, 'yield' at top level
        raise UsageError(f"%%miniray map: the cell body cannot run per item: {e.msg} "
                         f"(line {e.lineno})") from None
    ns = {"__name__": "__main__", "__builtins__": builtins}
    for name in free_names(tree):
        if name != arg and name in user_ns:
            ns[name] = user_ns[name]
    exec(code, ns)
    func = ns.pop(_FN)
    func.__qualname__ = func.__name__ = f"miniray_map_{arg}"
    # its frame is the cell's: tracebacks show it as IPython shows a cell's own frame
    func.__code__ = _unnest(rename(func.__code__, "<module>"), f"{_FN}.<locals>.")
    return func


def _unnest(code: types.CodeType, prefix: str) -> types.CodeType:
    """``code`` whose nested functions' qualified names lose ``prefix``: a lambda in the cell
    reads ``<lambda>``, as in any cell, not ``__miniray_cell__.<locals>.<lambda>``."""
    consts = tuple(_unnest(c, prefix) if isinstance(c, types.CodeType) else c
                   for c in code.co_consts)
    qualname = getattr(code, "co_qualname", None)
    if qualname is None:  # (Python < 3.11)
        return code.replace(co_consts=consts)
    return code.replace(co_consts=consts, co_qualname=qualname.removeprefix(prefix))


class _Discard(io.RawIOBase):
    def writable(self):
        return True

    def write(self, b):
        return len(b)


def _pickles(obj) -> Exception | None:
    """Why ``obj`` cannot be pickled, or None. Nothing is kept (large buffers are not even
    copied): this walks what would be sent."""
    try:
        cloudpickle.Pickler(_Discard(), protocol=5, buffer_callback=lambda b: False).dump(obj)
        return None
    except Exception as e:
        return e


def check_sendable(func) -> None:
    """Raise ``UsageError`` naming the captured variable that cannot travel to workers (a lock,
    an open file, a socket, a generator, ...), before anything is shown or submitted."""
    captured = {k: v for k, v in func.__globals__.items()
                if k not in ("__name__", "__builtins__") and not isinstance(v, types.ModuleType)}
    # (cloudpickle would send a file open for reading as a copy of its text, not the file)
    has_file = any(map(_open_file, captured.values()))
    why = None if has_file else _pickles(func)
    if why is None and not has_file:
        return
    for name, value in captured.items():
        cause = "an open file" if _open_file(value) else _pickles(value)
        if cause is None:
            continue
        if isinstance(value, (types.FunctionType, type)):  # the culprit is inside it
            raise UsageError(
                f"%%miniray map: the cell uses `{name}` ({_kind(value)}), which cannot be sent "
                f"to workers: {cause}. Create what it needs inside it (or pass that instead)")
        raise UsageError(
            f"%%miniray map: the cell uses `{name}` ({_kind(value)}), which cannot be sent to "
            "workers: create it inside the cell (or pass what it needs instead)")
    raise UsageError(f"%%miniray map: the cell cannot be sent to workers: "
                     f"{type(why).__name__}: {why}")


def check_items(items: list, expr: str) -> None:
    """Raise ``UsageError`` naming the first item of EXPR that cannot travel to workers."""
    if _pickles(items) is None and not any(map(_open_file, items)):
        return
    for i, value in enumerate(items):
        if _open_file(value) or _pickles(value) is not None:
            raise UsageError(
                f"%%miniray map: item {i} of {expr} is {_kind(value)}, which cannot be sent to "
                "workers: make EXPR give plain data (a path, not an open file; the arguments "
                "to build an object, not the object)")


def _open_file(value) -> bool:
    """A file object backed by a file descriptor (not an ``io.StringIO``)."""
    if not isinstance(value, io.IOBase):
        return False
    try:
        value.fileno()
        return True
    except Exception:
        return False


def _kind(value) -> str:
    t = type(value)
    name = t.__qualname__ if t.__module__ == "builtins" else f"{t.__module__}.{t.__qualname__}"
    return f"an open file, {name}" if _open_file(value) else f"a {name}"
