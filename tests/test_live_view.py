"""The live view of a map (issue 15): the bar's parts, the lanes' own CPU and memory, the
stragglers and the timeline, the log tail the browser filters; with real maps on the local
cluster where the behaviour comes from the engine."""

import functools
import time

import pytest

pytest.importorskip("anywidget")

import miniray  # noqa: E402
from miniray import LogLine  # noqa: E402
from jupyter_ext.display import WidgetView  # noqa: E402
from jupyter_ext.lanes import lanes_html  # noqa: E402
from jupyter_ext.logs import LogBuffer  # noqa: E402
from jupyter_ext.progress import MapProgress  # noqa: E402
from jupyter_ext.run import MapRun  # noqa: E402
from jupyter_ext.timeline import timeline_html  # noqa: E402
from support import wait_for  # noqa: E402
import tasks  # noqa: E402

pytestmark = pytest.mark.timeout(90)


def test_a_cancelled_map_shows_its_parts_and_never_100_percent(tmp_path):
    miniray.init(workers=2)
    (tmp_path / "go").touch()  # items 0 and 1 pass the gate at once; the rest sleep
    fn = functools.partial(tasks.gate, str(tmp_path))

    def work(x):
        return fn(str(x)) if x < 2 else time.sleep(5)

    run = MapRun(work, range(12), job_name="cancel-bar", view="widget")
    wait_for(lambda: run.model.done >= 2, timeout=30, what="two items done")
    run.cancel()
    run.settle()
    s, head = run.model.snapshot(), run.view.widget.head
    assert s["state"] == "cancelled" and 2 <= s["done"] < 12, s
    assert 'class="miniray-bar-done"' in head and 'class="miniray-bar-cancelled"' in head
    assert f"{s['done'] * 100 // 12}%" in head and "100%" not in head
    assert "--jp-warn-color1" in head  # cancelled in its own colour
    assert run.view.widget.lanes == ""  # no lane left busy


def test_a_lane_shows_its_workers_own_cpu_and_memory_and_the_machine_once():
    machine = {"host": "box", "cpu_percent": 87.0, "ram_used": 3 * 2**30, "ram_total": 8 * 2**30}
    workers = [dict(machine, id="a", name="w-a", slots=2, busy=2, proc_cpu_percent=150.0,
                    proc_rss=300 * 2**20),
               dict(machine, id="b", name="w-b", slots=1, busy=0)]  # no per-process fields
    lanes = lanes_html(workers, {"a": 7})
    rows = lanes.split("<tr")
    host_rows = [r for r in rows if "miniray-host" in r]
    assert len(host_rows) == 1 and "87%" in host_rows[0] and "3.0 GB/8.0 GB" in host_rows[0]
    (lane_a,) = [r for r in rows if "w-a" in r]
    (lane_b,) = [r for r in rows if "w-b" in r]
    assert "150%" in lane_a and "RSS 300.0 MB" in lane_a and "7 items" in lane_a
    assert "CPU" not in lane_b and "87%" not in lane_b and "GB" not in lane_b
    assert lanes.count("machine CPU") == 1 and lanes.count("8.0 GB") == 1


def test_stragglers_while_running_then_the_slowest_or_nothing_without_timings(tmp_path):
    miniray.init(workers=2)
    fn = functools.partial(tasks.gate, str(tmp_path))

    def work(x):
        return fn("slow") if x == 1 else x

    run = MapRun(work, range(6), job_name="stragglers", view="widget")
    wait_for(lambda: "#1</b>" in run.view.widget.stragglers, timeout=30,
             what="item 1 listed as running longest")
    assert "running longest" in run.view.widget.stragglers
    (tmp_path / "go").touch()
    run.wait(30)
    run.settle()
    w = run.view.widget
    timed = [f for f in run.futures if getattr(f, "started_at", None) is not None]
    if timed:  # the engine times items: the slowest are listed and drawn
        assert "slowest items" in w.stragglers and "#1</b>" in w.stragglers
        assert "item 1 took" in w.timeline
    else:  # nothing is made up: no slowest list, no timeline
        assert w.stragglers == "" and w.timeline == ""


def test_the_timeline_has_a_row_per_worker_slot_and_a_bar_per_item():
    m = MapProgress(4, "tl")
    t0 = 1_700_000_000.0
    m.item_finished(0, worker="w-a", slot=0, started_at=t0, finished_at=t0 + 1)
    m.item_finished(1, worker="w-a", slot=1, started_at=t0, finished_at=t0 + 4)
    m.item_finished(2, ValueError("x"), worker="w-a", slot=0, started_at=t0 + 1,
                    finished_at=t0 + 2)
    m.item_finished(3, worker="w-b", slot=0, started_at=t0 + 2, finished_at=t0 + 3)
    m.finish()
    s = m.snapshot()
    # the slowest items, when they took clearly longer than a typical one (median 1 s)
    assert [i for i, _, _ in s["stragglers"]] == [1]
    html = timeline_html(s["timings"])
    assert "3 worker slot(s), 4.0s" in html
    assert html.index("w-a / 0") < html.index("w-a / 1") < html.index("w-b / 0")
    assert 'title="item 1 took 4.0s"' in html and 'title="item 2 failed after 1.0s"' in html
    assert html.count("--jp-error-color1") == 1  # the failed item's bar
    assert timeline_html([]) == ""


def test_the_widget_holds_a_numbered_log_tail_and_says_how_many_lines_are_hidden():
    m, logs = MapProgress(1, "chatty", job="J7"), LogBuffer(max_per_second=10_000)
    v = WidgetView(m, logs)
    assert v.widget.logs == []  # the browser hides the pane: no empty "(no output)"
    for i in range(250):
        logs.add(LogLine(f"{i}-0", 0.0, i, f"w{i % 2}", "h", "stdout", f"line {i}"))
    v.render()
    w = v.widget
    seqs = [seq for seq, *_ in w.logs]
    assert seqs == list(range(50, 250)) and w.logs[-1][1:] == ["w1", "[w1 #249] line 249",
                                                                 False]
    assert w.log_note == "50 earlier line(s) hidden: %miniray logs J7 shows them all"
    assert w.log_workers == ["w0", "w1"]
