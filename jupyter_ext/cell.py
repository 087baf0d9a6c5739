"""Turn a ``%%miniray map`` cell body into a picklable function of one item.

The body becomes ``def cell(NAME): ...`` whose last expression statement is returned (the
value a cell would display). The names it reads from the notebook are copied into a fresh
globals dict, so cloudpickle ships exactly those: modules by reference, functions and
classes defined in the notebook (``__main__``) by value.
"""

from __future__ import annotations

import ast
import builtins

from IPython.core.error import UsageError

__all__ = ["compile_cell", "free_names"]

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


def compile_cell(body: str, arg: str, user_ns: dict, filename: str = "<miniray cell>"):
    """The function ``arg -> value of the body's last expression``, with its names captured.

    >>> f = compile_cell("y = x * k\\ny + 1", "x", {"k": 10})
    >>> f(2)
    21
    """
    if not arg.isidentifier():
        raise UsageError(f"%%miniray map: {arg!r} is not a valid variable name")
    try:
        tree = ast.parse(body, filename=filename, mode="exec")
    except SyntaxError as e:
        where = f"line {e.lineno}" + (f", column {e.offset}" if e.offset else "")
        text = (e.text or "").rstrip()
        raise UsageError(f"%%miniray map: syntax error in the cell body at {where}: {e.msg}"
                         + (f"\n    {text}" if text else "")) from None
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
    return func
