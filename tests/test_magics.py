"""%load_ext miniray, %%miniray map and %miniray ... through a real InteractiveShell against the
embedded local cluster (a real server and real worker processes)."""

import _thread
import signal
import threading
import time

import re

import pytest

pytest.importorskip("IPython")

from IPython.core.error import UsageError  # noqa: E402
from IPython.core.interactiveshell import InteractiveShell  # noqa: E402

import miniray  # noqa: E402
from jupyter_ext.magics import split_map_line  # noqa: E402

pytestmark = pytest.mark.timeout(60)


@pytest.fixture(scope="module")
def shell():
    import sys

    hooks = sys.displayhook, sys.excepthook
    sh = InteractiveShell.instance()
    sh.run_line_magic("load_ext", "miniray")
    sh.run_line_magic("miniray", "local -n 2")
    yield sh
    sh.run_line_magic("miniray", "down")
    InteractiveShell.clear_instance()
    sys.displayhook, sys.excepthook = hooks


def magics(sh):
    return sh.magics_manager.registry["MinirayMagics"]


def cell(sh, line, body):
    return sh.run_cell_magic("miniray", line, body)


def test_captures_names_and_stores_ordered_results(shell):
    shell.run_cell("import numpy as np\nscale = 3\ndef helper(v): return v + 1\n"
                   "class Box:\n    def __init__(self, v): self.v = v\n")
    assert cell(shell, "map x in range(200) -o out --chunksize 7",
                "y = helper(x) * scale\nBox(float(np.sqrt(y))).v") is None
    import math

    assert shell.user_ns["out"] == [math.sqrt((x + 1) * 3) for x in range(200)]


def test_without_o_the_list_is_the_cell_value(shell):
    assert cell(shell, "map item in ['a', 'b', 'c']", "item.upper()") == ["A", "B", "C"]
    # a body that ends in a statement gives None per item, as a cell displays nothing
    assert cell(shell, "map x in range(3)", "y = x * 2") == [None, None, None]


def test_expr_with_minus_signs_and_options(shell):
    assert cell(shell, "map v in range(-3, 3 - 1) --priority 5 --job-name neg", "v * 10") == \
        [-30, -20, -10, 0, 10]


def test_usage_errors_submit_nothing(shell):
    before = len(magics(shell).runs)
    cases = [
        ("map x in range(3)", "y = (", "syntax error"),
        # the line in the cell (the %%miniray line is line 1)
        ("map x in range(3)", "a = 1\ny = (", "syntax error in the cell body at line 3"),
        ("map x in range(3) --bogus 1", "x", "unrecognized arguments"),
        ("map x in no_such_name", "x", "cannot evaluate EXPR"),
        ("map x in 5", "x", "not iterable"),
        ("map x in range(3) -o 1abc", "x", "-o needs a variable name"),
        ("map x in range(3) --chunksize 0", "x", "--chunksize must be >= 1"),
        ("map x in range(3) --timeout -1", "x", "timeout_seconds"),
        ("map x range(3)", "x", "expected %%miniray map NAME in EXPR"),
        ("reduce x in range(3)", "x", "expected %%miniray map"),
        ("map x in [1, __import__('threading').Lock()]", "x",
         "item 1 of .* is a _thread.lock, which cannot be sent to workers"),
    ]
    for line, body, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            cell(shell, line, body)
    assert len(magics(shell).runs) == before
    for line, message in [("", "usage"), ("frobnicate", "unknown command"),
                          ("up gpu1=0", "at least 1 slot"), ("up", "required: HOST"),
                          ("local -n 0", "at least 1"), ("logs no-such-job", "no job named")]:
        with pytest.raises(UsageError, match=message):
            shell.run_line_magic("miniray", line)


def test_failure_raises_the_users_type_after_every_item_ran(shell):
    with pytest.raises(ZeroDivisionError) as info:
        cell(shell, "map x in range(12) -o res", "1 / (x % 5 - 2)")
    assert isinstance(info.value.__cause__, miniray.RemoteTraceback)
    assert "ZeroDivisionError" in str(info.value.__cause__)
    res = shell.user_ns["res"]
    assert res[0] == 1 / (0 - 2) and res[2] is None and res[7] is None and res[11] == 1 / (1 - 2)
    run = magics(shell).runs[-1]
    assert sorted(run.errors) == [2, 7]
    (group,) = run.model.snapshot()["errors"]
    assert group.type == "ZeroDivisionError" and group.count == 2 and group.first == 2
    assert "division by zero" in group.traceback and group.hosts
    assert run.model.state == "failed"


def test_timeout_option_fails_items_with_timeout_error(shell):
    with pytest.raises(TimeoutError):
        cell(shell, "map x in range(2) --timeout 0.5", "import time\ntime.sleep(30)")


@pytest.fixture
def kernel_sigint():
    """SIGINT raises KeyboardInterrupt, as in a kernel (``interrupt_main()`` does nothing
    where something earlier in the process left another handler or SIG_IGN in place)."""
    old = signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    signal.signal(signal.SIGINT, old)


def test_interrupt_cancels_the_job_and_keeps_results_so_far(shell, kernel_sigint):
    m, before = magics(shell), len(magics(shell).runs)
    stop = threading.Event()

    def interrupt_once_some_are_done():  # what the kernel's interrupt does: SIGINT
        while not stop.wait(0.05):
            if len(m.runs) > before and m.runs[-1].model.done >= 2:
                _thread.interrupt_main()
                return

    helper = threading.Thread(target=interrupt_once_some_are_done, daemon=True)
    helper.start()
    try:
        # it re-raises the interrupt ("Run All" stops there) after storing the partial results
        with pytest.raises(KeyboardInterrupt, match="so far are in part"):
            cell(shell, "map x in range(40) -o part", "import time\ntime.sleep(0.3)\nx")
    finally:
        stop.set()
        helper.join()
    part = shell.user_ns["part"]
    assert len(part) == 40
    done = [v for v in part if v is not None]
    assert 0 < len(done) < 40 and all(part[v] == v for v in done)
    run = magics(shell).runs[-1]
    assert run.model.state == "cancelled" and run.progress()["cancelled"] > 0
    # the workers were freed: running items were interrupted, queued ones dropped
    assert cell(shell, "map x in range(2)", "x") == [0, 1]


def test_bg_returns_a_handle_at_once_that_can_cancel(shell):
    cell(shell, "map x in range(30) -o h --bg", "import time\ntime.sleep(0.5)\nx")
    h = shell.user_ns["h"]
    assert not h.done()  # the cell returned while the map runs
    h.cancel()
    assert h.done() and h.progress()["state"] == "cancelled"
    assert len(h.results()) == 30
    with pytest.raises(Exception, match="cancelled"):
        h.result()


def test_bg_handle_result_and_cell_value(shell):
    h = cell(shell, "map x in range(10) --bg", "x * x")
    assert h.result(timeout=30) == [x * x for x in range(10)]
    assert h.progress()["done"] == 10
    assert "10/10 done" in repr(h)
    assert h._repr_mimebundle_()["text/plain"].startswith("miniray map")


def test_bg_on_a_cluster_that_lives_in_the_kernel_says_so_once(shell, capsys):
    magics(shell)._told_bg = False
    capsys.readouterr()
    for _ in range(2):
        assert cell(shell, "map x in range(2) --bg", "x").result(timeout=30) == [0, 1]
    out = capsys.readouterr().out
    assert out.count("stops if the kernel dies") == 1 and "%miniray local --persist" in out


def test_line_magics_status_logs_cancel(shell, capsys):
    cell(shell, "map x in range(4) --job-name chatty", "print('hello from', x)\nx")
    capsys.readouterr()
    shell.run_line_magic("miniray", "status")
    out = capsys.readouterr().out
    assert "workers: 2" in out and re.search(r"'chatty'\s+done\s", out), out
    shell.run_line_magic("miniray", "logs chatty --tail 10")
    out = capsys.readouterr().out
    assert "hello from 3" in out and "#3]" in out
    shell.run_line_magic("miniray", "cancel")
    assert "cancelled 0 running map(s)" in capsys.readouterr().out


def test_connect_reuses_one_connection_and_reports_bad_urls(shell, capsys):
    with pytest.raises(UsageError, match="cannot reach"):
        shell.run_line_magic("miniray", "connect redis://:secret@127.0.0.1:1")
    url = miniray.init().url
    shell.run_line_magic("miniray", f"connect {url}")
    assert "worker(s) alive" in capsys.readouterr().out
    view = magics(shell)._view
    assert cell(shell, "map x in range(3)", "x + 1") == [1, 2, 3]
    shell.run_line_magic("miniray", "status")
    assert magics(shell)._view is view
    shell.run_line_magic("miniray", "local -n 2")
    assert magics(shell).redis_url is None


def test_split_map_line():
    assert split_map_line("map x in range(3) -o out") == ("x", "range(3)", "-o out")
    assert split_map_line("map x in [a - b, c -d] --bg") == ("x", "[a - b, c -d]", "--bg")
    assert split_map_line("map s in 'x -o y'.split()") == ("s", "'x -o y'.split()", "")
    assert split_map_line("map x in a - b") == ("x", "a - b", "")


def test_gpu_memory_and_triton_options_reach_the_limits(shell):
    # the local workers have no GPU and no Triton: the job waits in the queue, as it must
    h = cell(shell, "map x in range(3) --bg --gpu-memory 2 --triton", "x")
    try:
        lim = h.executor.limits
        assert (lim.gpus, lim.gpu_memory_gb, lim.triton) == (1, 2.0, True)
        time.sleep(0.5)  # room for a wrong placement to show itself
        assert h.progress()["queued"] == 3 and not h.done()
    finally:
        h.cancel()
    with pytest.raises(UsageError, match="gpu_memory_gb"):
        cell(shell, "map x in range(3) --gpu-memory -1", "x")
