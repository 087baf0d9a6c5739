"""Errors that point at the user's code, as a notebook user sees them: a real kernel
(jupyter_client), a real local cluster, the error text read off the kernel's iopub channel."""

import os
import re

import pytest

pytest.importorskip("ipykernel")
jupyter_client = pytest.importorskip("jupyter_client")

import miniray  # noqa: E402
from kernels import ANSI, Kernel  # noqa: E402

pytestmark = pytest.mark.timeout(180)

# the package's own folder (not "miniray/": a clone's folder is named miniray too) covers every
# frame of the engine, wherever a part's modules move
_INTERNAL = ("taskproc", "taskrun", "run_cell_magic", "magics.py", "<dynamic-code>", "<miniray",
             "executor.py", "cloudpickle", "RemoteTraceback",
             os.path.dirname(miniray.__file__) + os.sep)


def error_text(outputs) -> str:
    errors = [c for kind, c in outputs if kind == "error"]
    assert len(errors) == 1, outputs
    return ANSI.sub("", "\n".join(errors[0]["traceback"]))


@pytest.fixture(scope="module")
def kernel():
    k = Kernel()
    try:
        _, out = k.cell("%load_ext miniray\n%miniray local -n 2")
        assert not [c for kind, c in out if kind == "error"], out
        yield k
    finally:
        k.close()


def test_a_failing_item_shows_the_cells_lines_not_miniray_frames(kernel):
    helper_cell, _ = kernel.cell("def helper(v):\n"
                                "    if v == 7:\n"
                                "        raise ValueError(f'bad value {v}')\n"
                                "    return v * 2\n")
    map_cell, out = kernel.cell("%%miniray map x in range(10)\n"
                               "a = x + 1\n"
                               "b = a * 2\n"
                               "helper(x) + b\n")
    text = error_text(out)
    # the map cell's line 4 (the %%miniray line is line 1), with its source, then the helper's
    # line 3 in the cell that defined it, as IPython shows a local error
    assert re.search(rf"Cell In\[{map_cell}\], line 4\n(.*\n)*----> 4 helper\(x\) \+ b", text), text
    assert re.search(rf"Cell In\[{helper_cell}\], line 3, in helper\(v\)\n(.*\n)*"
                     r"----> 3\s+raise ValueError", text), text
    assert text.index(f"Cell In[{map_cell}]") < text.index(f"Cell In[{helper_cell}]")
    # the user's exception last, with the item that failed, its value and where it ran
    assert re.search(r"ValueError: bad value 7\n\[miniray\] item 7 of 10 \(x = 7\) failed on "
                     r"worker local-\d-\w+, host \S+\s*$", text), text
    for internal in _INTERNAL:
        assert internal not in text, (internal, text)
    # printed once: one error, and the traceback has one "Traceback" header
    assert text.count("Traceback (most recent call last)") == 1, text
    assert text.count("bad value 7") == 1, text


def test_the_error_table_of_the_map_shows_the_cells_lines_too(kernel):
    import html

    cell, out = kernel.cell("%%miniray map x in range(6)\n"
                           "y = x - 4\n"
                           "1 / y\n")
    snapshots = [c["data"]["text/html"] for kind, c in out
                 if kind == "update_display_data" and "text/html" in c["data"]]
    assert snapshots, out
    table = html.unescape(snapshots[-1])
    assert "ZeroDivisionError" in table
    assert re.search(rf"Cell In\[{cell}\], line 3\n(.*\n)*----> 3 1 / y", table), table
    assert "ipykernel_" not in table and "Traceback from" not in table, table


def test_an_error_in_the_cell_body_itself_shows_its_line(kernel):
    n, out = kernel.cell("%%miniray map x in range(4)\n"
                        "y = 10\n"
                        "y / (x - 2)\n")
    text = error_text(out)
    assert re.search(rf"Cell In\[{n}\], line 3\n(.*\n)*----> 3 y / \(x - 2\)", text), text
    assert "ZeroDivisionError: division by zero" in text
    assert "[miniray] item 2 of 4 (x = 2) failed" in text
    for internal in _INTERNAL:
        assert internal not in text, (internal, text)


def test_an_exception_raised_from_another_shows_both_with_their_lines(kernel):
    n, out = kernel.cell("%%miniray map x in [{'a': 1}, {'b': 2}]\n"
                        "try:\n"
                        "    x['a']\n"
                        "except KeyError as e:\n"
                        "    raise RuntimeError('no a') from e\n")
    text = error_text(out)
    assert re.search(rf"KeyError +Traceback \(most recent call last\)\nCell In\[{n}\], line 3"
                     r"\n(.*\n)*----> 3     x\['a'\]\n(.*\n)*KeyError: 'a'\n\n"
                     r"The above exception was the direct cause of the following exception:\n\n"
                     rf"RuntimeError +Traceback \(most recent call last\)\nCell In\[{n}\], line 5"
                     r"\n(.*\n)*----> 5     raise RuntimeError\('no a'\) from e\n\n"
                     r"RuntimeError: no a\n\[miniray\] item 1 of 2 \(x = \{'b': 2\}\)", text), text
    for internal in _INTERNAL:
        assert internal not in text, (internal, text)


def test_a_bg_maps_result_shows_the_cells_line(kernel):
    n, _ = kernel.cell("%%miniray map x in range(5) --bg -o handle\n"
                      "1 / (x - 3)\n")
    _, out = kernel.cell("handle.wait(60)\nhandle.result()")
    text = error_text(out)
    assert re.search(rf"Cell In\[{n}\], line 2\n(.*\n)*----> 2 1 / \(x - 3\)\n\n"
                     r"ZeroDivisionError: division by zero\n"
                     r"\[miniray\] item 3 of 5 \(x = 3\) failed", text), text
    for internal in _INTERNAL + ("run.py",):
        assert internal not in text, (internal, text)


def test_a_timeout_shows_no_frames_of_miniray(kernel):
    _, out = kernel.cell("%%miniray map seconds in [0.1, 60] --timeout 1\n"
                        "import time\n"
                        "time.sleep(seconds)\n")
    text = error_text(out)
    assert re.search(r"TaskTimeoutError: task ran longer than its limit of 1 s.*\n"
                     r"\[miniray\] item 1 of 2 \(seconds = 60\) failed on worker", text), text
    assert "Cell In" not in text and "File " not in text, text
    for internal in _INTERNAL:
        assert internal not in text, (internal, text)


@pytest.mark.parametrize("setup, name, kind", [
    ("import threading\nthing = threading.Lock()", "thing", "a _thread.lock"),
    ("thing = open(__import__('os').devnull)", "thing", "an open file, _io.TextIOWrapper"),
    ("import socket\nthing = socket.socket()", "thing", "a socket.socket"),
    ("thing = (i for i in range(3))", "thing", "a generator"),
])
def test_a_capture_that_cannot_travel_fails_at_once_naming_it(kernel, setup, name, kind):
    runs = "len(get_ipython().magics_manager.registry['MinirayMagics'].runs)"
    _, out = kernel.cell(f"{setup}\n{runs}")
    before = out[-1][1]["data"]["text/plain"]
    # it ends by itself (it hung at "waiting for workers" before): the cell goes idle
    _, out = kernel.cell("%%miniray map x in range(3)\n"
                        f"str({name}) + str(x)\n", timeout=60)
    # a UsageError: one short message on stderr, no traceback, and no widget was shown
    assert [kind for kind, _ in out] == ["stream"], out
    text = out[0][1]["text"]
    assert out[0][1]["name"] == "stderr" and len(text.strip().splitlines()) == 1, text
    assert f"the cell uses `{name}` ({kind}), which cannot be sent to workers: create it " \
           "inside the cell" in text, text
    _, out = kernel.cell(runs)  # and nothing was submitted
    assert out[-1][1]["data"]["text/plain"] == before
