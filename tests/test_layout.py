"""The house rules of ``miniray/`` (issue 19), read from the source: a folder per part, no
module a newcomer cannot hold in their head, no import circles, foundations at the bottom.

The import graph is every ``import`` of a miniray module anywhere in a module (inside functions
too: a lazy import is still a dependency), except those only a type checker runs
(``if TYPE_CHECKING:``)."""

import ast
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "miniray")
MAX_LINES = 500
PARTS = ("client", "worker", "worker.task", "values", "cluster", "cluster.ssh", "triton",
         "channels")
FOUNDATIONS = ("errors", "config", "keys", "protocol", "serialization", "resp", "respwrite",
               "broker", "backoff", "tracebacks", "scratch")
NOTEBOOK = ("IPython", "ipywidgets", "ipykernel", "anywidget", "jupyter_ext")


def _modules() -> dict:
    """Dotted name -> (path, is_package) for every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                dotted = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
                if dotted.endswith(".__init__"):
                    dotted = dotted[: -len(".__init__")]
                out[dotted] = (path, name == "__init__.py")
    return out


MODULES = _modules()


def _type_checking_only(tree) -> set:
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for stmt in node.body for n in ast.walk(stmt))
    return skip


def _imports(dotted: str) -> dict:
    """What a module imports at run time: imported module -> first line."""
    path, is_package = MODULES[dotted]
    tree = ast.parse(open(path).read())
    skip = _type_checking_only(tree)
    package = dotted if is_package else dotted.rpartition(".")[0]
    found: dict = {}
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.setdefault(alias.name, node.lineno)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                sub = f"{module}.{alias.name}"
                found.setdefault(sub if sub in MODULES else module, node.lineno)
    return found


GRAPH = {m: {t: line for t, line in _imports(m).items() if t in MODULES and t != m}
         for m in MODULES}


def _cycles() -> list:
    """Strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v):
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in GRAPH:
        if v not in index:
            visit(v)
    return out


def test_no_import_circles():
    described = []
    for component in _cycles():
        edges = [f"{a} -> {b} (line {GRAPH[a][b]})" for a in component for b in GRAPH[a]
                 if b in component]
        described.append("\n  ".join(edges))
    assert not described, "import circles:\n  " + "\n\n  ".join(described)


@pytest.mark.parametrize("dotted", sorted(MODULES))
def test_no_module_over_the_limit(dotted):
    path, _ = MODULES[dotted]
    with open(path) as f:
        lines = sum(1 for _ in f)
    assert lines <= MAX_LINES, (
        f"{os.path.relpath(path, ROOT)} has {lines} lines (the house's limit is {MAX_LINES}): "
        "cut it into modules with one job each")


def test_each_part_is_a_folder_that_says_what_it_owns():
    for part in PARTS:
        dotted = f"miniray.{part}"
        assert dotted in MODULES and MODULES[dotted][1], f"{dotted} is not a package"
        doc = ast.get_docstring(ast.parse(open(MODULES[dotted][0]).read())) or ""
        assert len(doc.splitlines()) >= 3 and "TODO" not in doc, (
            f"{dotted}/__init__.py should open with what the part owns")


def test_foundations_import_no_part():
    for name in FOUNDATIONS:
        dotted = f"miniray.{name}"
        assert dotted in MODULES, f"{dotted} is gone: update FOUNDATIONS"
        above = [t for t in GRAPH[dotted]
                 if t.split(".")[1] not in FOUNDATIONS and t != "miniray"]
        assert not above, f"{dotted} is a foundation but imports {above}"


def test_provisioning_does_not_depend_on_channels():
    for dotted, targets in GRAPH.items():
        if dotted.startswith(("miniray.cluster", "miniray.client", "miniray.worker",
                              "miniray.values", "miniray.triton")):
            bad = [t for t in targets if t.startswith("miniray.channels")]
            assert not bad, f"{dotted} imports {bad}: channels build on the engine, not under it"


def test_the_engine_never_imports_the_notebook_face():
    for dotted in MODULES:
        bad = [t for t in _imports(dotted) if t.split(".")[0] in NOTEBOOK]
        if dotted == "miniray":  # load_ipython_extension: the one documented lazy import
            bad = [t for t in bad if t != "jupyter_ext"]
        assert not bad, f"{dotted} imports {bad}"


def test_what_task_processes_import_first_is_light():
    # ``python -m miniray.worker.task`` imports these packages before its own code runs
    for package in ("miniray.worker", "miniray.worker.task"):
        assert not _imports(package), f"{package}/__init__.py must import nothing"


def test_readme_says_where_things_are():
    text = open(os.path.join(ROOT, "README.md")).read()
    section = re.search(r"^## Where things are\n(.*?)(?=^## )", text, re.S | re.M)
    assert section, "README.md has no '## Where things are' section"
    for part in PARTS:  # one line per folder of the tree under miniray/
        folder = part.replace(".", "/") + "/"
        assert re.search(r"^ +" + re.escape(folder) + " ", section.group(1), re.M), (
            f"README's 'Where things are' does not list miniray/{folder}")


def test_old_module_paths_still_import():
    # comma's miniray and our own earlier layout had these at the top of the package
    code = ("import miniray.executor, miniray.local, miniray.persistent, miniray.client.executor\n"
            "from miniray.executor import Executor\n"
            "assert miniray.executor is miniray.client.executor\n"
            "assert Executor is miniray.Executor\n"
            "assert miniray.local.LocalCluster is miniray.LocalCluster\n"
            "assert miniray.persistent.find is miniray.cluster.persistent.find\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60, cwd=ROOT)
