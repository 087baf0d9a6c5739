"""``%miniray debug`` in a real kernel (jupyter_client) with a real local cluster: the failed
item re-runs in the kernel and IPython's debugger, driven through the kernel's stdin as a
frontend drives it, stops at the cell's failing line."""

import re

import pytest

pytest.importorskip("ipykernel")
pytest.importorskip("jupyter_client")

from kernels import Kernel  # noqa: E402

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
def kernel():
    k = Kernel()
    try:
        out = k.run("%load_ext miniray\n%miniray local -n 1")
        assert "local cluster up" in out["stream"], out
        yield k
    finally:
        k.close()


def usage_error(out) -> str:
    """The UsageError IPython printed (on stderr: no traceback)."""
    assert out["error"] is None, out["error"]
    match = re.search(r"UsageError: (.*)", out["stream"])
    assert match, out["stream"]
    return match.group(1)


def test_debug_stops_at_the_cells_failing_line_and_the_kernel_goes_on(kernel):
    assert "no map has run" in usage_error(kernel.converse("%miniray debug", []))
    count, _ = kernel.cell("%%miniray map x in range(5)\n"
                           "if x == 3: raise ValueError(f'bad item {x}')\n"
                           "x * 2\n")
    out = kernel.converse("%miniray debug", ["p x", "up", "q"], timeout=60)
    text = out["transcript"]
    assert out["error"] is None, out["error"]
    assert re.search(r"^miniray: re-running item 3 of job 'map x in range\(5\)' \(\S+\) here, "
                     r"with x = 3$", text, re.M), text
    # the debugger's location: the cell's line 2 (the %%miniray line is line 1), its source
    assert re.search(r"^ValueError: bad item 3\n> \S+\(2\)<module>\(\)\n(.*\n)*"
                     r"----> 2 if x == 3: raise ValueError", text, re.M), text
    # the item's own argument, and no frame of miniray or IPython under the cell's
    assert "ipdb> p x\n3\n" in text, text
    assert "ipdb> up\n*** Oldest frame\n" in text, text
    assert out["prompts"] == ["ipdb> "] * 3, out["prompts"]
    # (a module of the package, not "miniray/": a clone's folder is named miniray too)
    assert not re.search(r"(miniray|jupyter_ext|IPython)/\w+\.py", text), text
    # %debug reopens it, at the same line
    again = kernel.converse("%debug", ["p x * 10", "q"], timeout=60)["transcript"]
    assert re.search(r"^> \S+\(2\)<module>\(\)\n", again, re.M), again
    assert "ipdb> p x * 10\n30\n" in again, again
    # the kernel is still usable: the next cell runs
    assert kernel.run("21 * 2")["data"] == [{"text/plain": "42"}]
    assert count  # (the map cell ran)


def test_usage_errors_and_a_helpers_failing_line(kernel):
    kernel.run("def helper(v):\n"
               "    if v == 2:\n"
               "        raise KeyError(v)\n"
               "    return v\n")
    kernel.cell("%%miniray map x in range(4)\n"
                "helper(x)\n")
    message = usage_error(kernel.converse("%miniray debug 1", []))
    assert re.search(r"item 1 of the last map \('map x in range\(4\)', job \S+\) did not "
                     r"fail; the failed item\(s\): 2", message), message
    assert "0 to 3; there is no item 9" in usage_error(kernel.converse("%miniray debug 9", []))
    assert "usage: %miniray debug [ITEM]" in usage_error(kernel.converse("%miniray debug x", []))
    # the failed one opens the debugger where it raised, in the helper; up: the map cell
    out = kernel.converse("%miniray debug 2", ["p v + 40", "up", "p x", "q"], timeout=60)
    text = out["transcript"]
    assert re.search(r"^> \S+\(3\)helper\(\)\n(.*\n)*----> 3\s+raise KeyError", text, re.M), text
    assert "ipdb> p v + 40\n42\n" in text, text
    assert re.search(r"ipdb> up\n> \S+\(2\)<module>\(\)\n(.*\n)*----> 2 helper\(x\)\n"
                     r"(.*\n)*ipdb> p x\n2\n", text), text
