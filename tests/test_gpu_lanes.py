"""GPU lanes: the sparkline renderer, the per-GPU history, and a real worker with ``--gpus 0,1``
seen by the widget, ``miniray status`` and ``%miniray status`` while a GPU task holds one GPU.

The renderer tests feed fixed heartbeat dicts; the last test reads real heartbeats (no NVML
here, so they carry the index and the holding job only)."""

import functools
import os
import re
import subprocess
import sys

import pytest
import tasks
from support import wait_for

import miniray
from jupyter_ext.display import TextView, WidgetView
from jupyter_ext.gpus import GpuHistory, gpu_row_html, sparkline_svg
from jupyter_ext.logs import LogBuffer
from jupyter_ext.progress import MapProgress
from jupyter_ext.run import MapRun
from miniray.client.observe import format_gpu

pytest.importorskip("ipywidgets")  # the views import it when they are built

pytestmark = pytest.mark.timeout(90)

GB = 2**30


def points(svg: str) -> list[tuple[float, float]]:
    m = re.search(r'<polyline points="([^"]*)"', svg)
    assert m, svg
    return [tuple(map(float, p.split(","))) for p in m.group(1).split()]


def sparklines(html: str) -> list[str]:
    return re.findall(r"<svg class=\"miniray-spark.*?</svg>", html)


def gpu_rows(html: str) -> dict[int, str]:
    return {int(i): row for i, row in
            re.findall(r'<tr class="miniray-gpu" data-gpu="(\d+)">(.*?)</tr>', html)}


def heartbeat(seen, util, used_gb, job=None, wid="box-1"):
    g = {"index": 0, "name": "H200", "util": util, "mem_used": used_gb * GB,
         "mem_total": 4 * GB, "temp": 41}
    if job:
        g["job"] = job
    return {"id": wid, "name": "box", "host": "h", "slots": 1, "busy": 1, "seen": seen,
            "gpus": [g, {"index": 1}]}


# -- the renderer -----------------------------------------------------------------------------
def test_sparkline_draws_values_as_points_inside_the_box():
    svg = sparkline_svg([0.0, 0.5, 1.0], "util", maxlen=10, width=90, height=14)
    pts = points(svg)
    assert len(pts) == 3
    assert all(0 <= x <= 90 and 0 <= y <= 14 for x, y in pts)
    (x0, y0), (x1, y1), (x2, y2) = pts
    assert y0 > y1 > y2  # higher values are drawn higher (smaller y)
    assert x2 == 90 and x1 - x0 == pytest.approx(10) and x2 - x1 == pytest.approx(10)
    assert "util: 100% now, last 3 sample(s)" in svg
    # values outside 0..1 are clamped into the box
    assert all(0 <= y <= 14 for _, y in points(sparkline_svg([-3, 7], width=90, height=14)))


def test_sparkline_keeps_the_last_samples_and_marks_an_empty_history():
    pts = points(sparkline_svg([i / 100 for i in range(100)], maxlen=60))
    assert len(pts) == 60
    assert pts[-1][1] < pts[0][1]  # the newest (0.99) is the highest
    empty = sparkline_svg([], "memory")
    assert "miniray-spark-empty" in empty and "<polyline" not in empty
    assert "no samples yet" in empty


def test_history_is_bounded_one_sample_per_heartbeat_and_forgets_gone_workers():
    h = GpuHistory(maxlen=5)
    for t in range(12):
        h.update([heartbeat(float(t), util=t * 5, used_gb=1)])
    h.update([heartbeat(11.0, util=99, used_gb=1)])  # the same heartbeat read again
    util, mem = h.snapshot()[("box-1", 0)]
    assert util == (0.35, 0.4, 0.45, 0.5, 0.55)
    assert mem == (0.25,) * 5
    assert ("box-1", 1) not in h.snapshot()  # no telemetry, no history
    h.update([heartbeat(12.0, util=10, used_gb=1, wid="other-2")])
    assert set(h.snapshot()) == {("other-2", 0)}


def test_lane_sparklines_follow_the_heartbeats_the_display_reads():
    m = MapProgress(2, "spark", job="J1")
    v = WidgetView(m, LogBuffer())
    for t, (util, used) in enumerate([(10, 1), (50, 2), (90, 3)]):
        m.set_workers([heartbeat(float(t), util, used, job="J1")])
    v.render()
    rows = gpu_rows(v.parts["lanes"])
    assert set(rows) == {0, 1}
    util_svg, mem_svg = sparklines(rows[0])
    util_y = [y for _, y in points(util_svg)]
    mem_y = [y for _, y in points(mem_svg)]
    assert len(util_y) == len(mem_y) == 3
    assert util_y[0] > util_y[1] > util_y[2] and mem_y[0] > mem_y[1] > mem_y[2]
    assert "90%" in rows[0] and "3.0 GB/4.0 GB" in rows[0] and "41°C" in rows[0]
    assert "miniray-gpu-mine" in rows[0] and "this map" in rows[0] and "J1" in rows[0]
    assert "no telemetry" in rows[1] and "idle" in rows[1] and "<svg" not in rows[1]
    m.set_workers([heartbeat(3.0, 20, 3, job="J2")])  # another job took the GPU
    v.render()
    row = gpu_rows(v.parts["lanes"])[0]
    assert len(points(sparklines(row)[0])) == 4
    assert "miniray-gpu-mine" not in row and "job <code>J2</code>" in row


def test_lane_without_telemetry_shows_the_gpu_and_its_holder():
    row = gpu_row_html("w-1", {"index": 3, "job": "J9"}, {}, this_job="J9")
    assert "GPU 3" in row and "no telemetry" in row and "miniray-gpu-mine" in row
    assert "<svg" not in row and "util" not in row
    packed = gpu_row_html("w-1", {"index": 0, "job": "A", "jobs": ["A", "B"],
                                  "reserved": 3 * GB}, None, "B")
    assert "miniray-gpu-mine" in packed and "<code>A</code> <code>B</code>" in packed
    assert "no telemetry" in packed and "reserved 3.0 GB" in packed
    assert format_gpu({"index": 0, "job": "A", "jobs": ["A", "B"], "reserved": 3 * GB}) == \
        "gpu 0  no telemetry  reserved=3.0 GB  job=A,B"


def test_text_fallback_and_format_gpu_give_one_line_per_gpu():
    m = MapProgress(1, "txt", job="J1")
    m.set_workers([heartbeat(1.0, 80, 2, job="J1")])
    text = TextView(m, LogBuffer())._repr_mimebundle_()["text/plain"].splitlines()
    assert text[0] == m.summary()
    assert text[1:] == [
        "  box: gpu 0  H200  util=80%  mem=2.0 GB/4.0 GB  temp=41C  job=J1 (this map)",
        "  box: gpu 1  no telemetry  idle"]
    assert format_gpu({"index": 2, "job": "J5"}, {"J5": "train"}) == \
        "gpu 2  no telemetry  job=J5 ('train')"
    # before any heartbeat is read the text is the summary alone (nbval outputs stay stable)
    assert TextView(MapProgress(1, "x"), LogBuffer())._repr_mimebundle_() == \
        {"text/plain": MapProgress(1, "x").summary()}


# -- real heartbeats --------------------------------------------------------------------------
def _status_cli(cluster) -> str:
    env = dict(os.environ, MINIRAY_REDIS_URL=cluster.url, MINIRAY_NAMESPACE=cluster.namespace)
    out = subprocess.run([sys.executable, "-m", "miniray.cli", "status"], env=env,
                         capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    return out.stdout


def _status_magic(url, capsys) -> str:
    pytest.importorskip("IPython")
    from IPython.core.interactiveshell import InteractiveShell

    hooks = sys.displayhook, sys.excepthook
    sh = InteractiveShell.instance()
    try:
        sh.run_line_magic("load_ext", "miniray")
        sh.run_line_magic("miniray", f"connect {url}")
        capsys.readouterr()
        sh.run_line_magic("miniray", "status")
        out = capsys.readouterr().out
        sh.run_line_magic("miniray", "down")  # only disconnects: the cluster is the fixture's
        return out
    finally:
        InteractiveShell.clear_instance()
        sys.displayhook, sys.excepthook = hooks


def test_a_gpu_worker_shows_a_lane_per_gpu_and_the_holding_job(cluster, tmp_path, capsys):
    cluster.start_worker("--gpus", "0,1", name="gpuw")
    run = MapRun(functools.partial(tasks.gate, str(tmp_path)), ["a"], redis_url=cluster.url,
                 job_name="gpu-lanes", limits=miniray.Limits(gpus=1), view="widget")
    try:
        started = tmp_path / "started-a"
        wait_for(started.exists, timeout=30, what="the GPU task to start")
        held = int(started.read_text())
        idle = 1 - held
        wait_for(lambda: "miniray-gpu-mine" in run.view.parts["lanes"], timeout=30,
                 what="the widget to show this map holding a GPU")
        lanes = run.view.parts["lanes"]
        rows = gpu_rows(lanes)
        assert set(rows) == {0, 1}, lanes
        assert run.job in rows[held] and "miniray-gpu-mine" in rows[held]
        assert "idle" in rows[idle] and "miniray-gpu-mine" not in rows[idle]
        (worker,) = cluster.workers()
        for g in worker["gpus"]:  # without NVML: "no telemetry"; with it: meters and sparklines
            if g.get("util") is None:
                assert "no telemetry" in rows[g["index"]] and "<svg" not in rows[g["index"]]
            else:
                assert "miniray-spark" in rows[g["index"]]
        text = run._repr_mimebundle_()["text/plain"]
        assert f"job={run.job} (this map)" in text and "gpuw: gpu" in text

        wait_for(lambda: any(g.get("task") == 0 for w in cluster.workers() for g in w["gpus"]),
                 what="a heartbeat naming the task on its GPU")  # status and magic agree
        out = _status_cli(cluster)
        lines = [ln.strip() for ln in out.splitlines() if ln.strip().startswith("gpu ")]
        assert len(lines) == 2, out
        busy = next(ln for ln in lines if ln.startswith(f"gpu {held} "))
        free = next(ln for ln in lines if ln.startswith(f"gpu {idle} "))
        assert busy.endswith(f"job={run.job} ('gpu-lanes')"), out
        assert free.endswith("idle"), out
        if worker["gpus"][0].get("util") is None:
            assert busy == f"gpu {held}  no telemetry  task=0  job={run.job} ('gpu-lanes')"

        magic = _status_magic(cluster.url, capsys)
        assert busy in magic and free in magic
        row = next(ln.split() for ln in magic.splitlines() if ln.split()[:1] == ["gpuw"])
        assert row[-1] == "2", magic  # the workers table's GPUS column
    finally:
        (tmp_path / "go").touch()
    assert run.result(timeout=30) == [str(held)]
    run.settle()
