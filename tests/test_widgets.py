"""The progress model and its views: counting, the live widget's traits, the text fallback,
and a real map rendered into a widget; the engine never imports the notebook face."""

import subprocess
import sys
import time

import pytest

pytest.importorskip("ipywidgets")

import miniray  # noqa: E402
from miniray import LogLine  # noqa: E402
from jupyter_ext.display import TextView, WidgetView, make_view  # noqa: E402
from jupyter_ext.logs import LogBuffer  # noqa: E402
from jupyter_ext.progress import MapProgress  # noqa: E402
from jupyter_ext.run import MapRun  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def line(i, worker="local-0", text="hi", stream="stdout"):
    return LogLine(f"{i}-0", 0.0, i, worker, "host1", stream, text)


def test_model_counts_and_summary():
    m = MapProgress(4, "demo")
    assert m.summary() == "miniray map 'demo' running: 0/4 done, 0 running, 4 queued"
    m.server_counts({"running": 2, "queued": 2})
    m.item_finished(0)
    m.item_finished(1, ValueError("bad"), host="h1")
    m.item_finished(3, ValueError("worse"), host="h2")
    assert m.item_finished(2) is True
    m.finish()
    s = m.snapshot()
    assert (s["done"], s["failed"], s["state"], s["running"], s["queued"]) == (2, 2, "failed", 0, 0)
    (g,) = s["errors"]
    assert (g.type, g.count, g.hosts, g.items, g.first) == \
        ("ValueError", 2, ["h1", "h2"], [1, 3], 1)
    assert "ValueError: bad" in g.traceback
    assert "finished with errors: 2/4 done, 2 failed, in" in m.summary()


def test_log_buffer_is_bounded_and_rate_limited():
    b = LogBuffer(capacity=5, max_per_second=8)
    for i in range(20):
        b.add(line(i, worker=f"w{i % 2}"))
    assert b.dropped == 12 and len(b.lines()) == 5
    assert b.workers == ["w0", "w1"]
    assert all(ln.worker == "w1" for ln in b.lines("w1"))
    assert "[w1 #7] hi" in b.text() and "12 line(s) dropped" in b.text()


def test_widget_view_renders_counts_lanes_logs_and_errors():
    m, logs = MapProgress(3, "w"), LogBuffer()
    cancelled = []
    v = WidgetView(m, logs, on_cancel=lambda: cancelled.append(1))
    w = v.widget
    assert w.cancellable and w.state == "running" and w.logs == []
    m.set_workers([{"name": "gpu-box", "host": "h", "slots": 2, "busy": 1, "tasks_done": 5,
                    "cpu_percent": 50.0, "ram_used": 2**30, "ram_total": 2**32,
                    "gpus": [{"index": 0, "name": "A100", "util": 80, "mem_used": 2**30,
                              "mem_total": 2**34, "temp": 60}, {"index": 1}]}])
    logs.add(line(2, worker="gpu-box", text="step <1>", stream="stderr"))
    m.item_finished(0)
    m.item_finished(1, KeyError("k"), host="h")
    v.render()
    head = w.head
    assert "1 done · 1 failed" in head and "33%" in head
    assert 'class="miniray-bar-done"' in head and 'class="miniray-bar-failed"' in head
    lanes = w.lanes
    assert "gpu-box" in lanes and "A100" in lanes and "80%" in lanes
    assert "GPU 1" in lanes  # a GPU without telemetry is listed, its fields absent
    assert w.logs == [[0, "gpu-box", "[gpu-box #2]! step <1>", True]]
    assert w.log_workers == ["gpu-box"] and w.log_note == ""
    assert "KeyError" in w.errors and "<details>" in w.errors
    w._handle_custom_msg({"event": "cancel"}, [])  # what the browser's Cancel button sends
    assert cancelled == [1]
    m.item_finished(2)
    m.finish()
    v.render()
    assert w.state == "failed" and "failed" in w.head
    assert w.lanes == ""  # the map is over: no busy lanes left behind
    bundle = v._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert bundle["text/plain"].startswith("miniray map 'w' finished with errors")


def test_all_succeeded_is_green_and_text_view_is_the_fallback():
    m = MapProgress(1, "g")
    v = make_view(m, LogBuffer(), kind="widget")
    m.item_finished(0)
    m.finish()
    v.render()
    assert v.widget.state == "done" and "100%" in v.widget.head
    assert "--jp-success-color1" in v.widget.head
    # outside a kernel, one function picks the text view
    t = make_view(m, LogBuffer())
    assert isinstance(t, TextView) and t._repr_mimebundle_() == {"text/plain": m.summary()}


def test_a_real_map_fills_the_widget_and_streams_logs():
    miniray.init(workers=2)

    def work(x):
        print(f"item {x} says hi")
        time.sleep(0.01)
        return x

    run = MapRun(work, range(40), job_name="widget-live", view="widget", chunksize=4)
    assert run.result(timeout=30) == list(range(40))
    run.settle()
    w = run.view.widget
    assert w.state == "done" and "40 done" in w.head and "100%" in w.head
    texts = [text for _, _, text, _ in w.logs]
    assert any("#39] item 39 says hi" in t for t in texts), texts
    assert sorted(w.log_workers) == ["local-0", "local-1"]
    # per-worker lanes count this map's items: together, every item
    assert sum(run.model.snapshot()["by_worker"].values()) == 40


def test_the_engine_never_imports_the_notebook_face():
    code = ("import sys, miniray\n"
            "ex = miniray.Executor()\n"
            "assert list(ex.map(abs, [-1, -2])) == [1, 2]\n"
            "ex.shutdown()\n"
            "import miniray.cli, miniray.client.observe, miniray.worker.supervisor\n"
            "bad = [m for m in sys.modules if m.split('.')[0] in "
            "('IPython', 'ipywidgets', 'jupyter_ext', 'ipykernel')]\n"
            "assert not bad, bad\n")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_cancel_button_of_a_background_map_cancels_it():
    miniray.init(workers=2)

    def slow(x):
        time.sleep(0.3)
        return x

    run = MapRun(slow, range(30), job_name="button", view="widget", cancel_button=True)
    assert run.view.widget.cancellable  # the button shows in --bg mode
    time.sleep(0.5)
    run.view.widget._handle_custom_msg({"event": "cancel"}, [])  # the button's message
    assert run.wait(10) and run.cancelled
    run.settle()
    w = run.view.widget
    assert w.state == "cancelled" and "cancelled" in w.head
    assert run.results().count(None) > 0


def test_engine_map_futures_keeps_every_outcome_and_cluster_view_sees_the_job():
    """The two engine additions the notebook face relies on."""
    from concurrent.futures import wait

    from miniray.client.observe import ClusterView
    from tasks import raise_value_error

    miniray.init(workers=2)
    with miniray.Executor(job_name="outcomes") as ex:
        futures = ex.map_futures(raise_value_error, [1, 3, 2, 3, 4], chunksize=2)
        wait(futures, timeout=30)
        assert [f.task_id for f in futures] == [0, 1, 2, 3, 4]
        outcomes = [type(f.exception()).__name__ if f.exception() else f.result()
                    for f in futures]
        view = ClusterView()
        assert view.find_job("outcomes") == ex.job_id
        assert len(view.workers()) == 2
        view.close()
    assert outcomes == [1, "ValueError", 2, "ValueError", 4]


