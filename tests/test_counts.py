"""One truth for counts: after a map (with failures, cancelled, or with a worker lost
mid-chunk) the widget's model (``MapRun.progress()``), ``Executor.progress()`` and what
``miniray status`` / ``%miniray status`` read (``ClusterView.jobs()``) say the same; workers'
heartbeats carry their own CPU and memory; items carry their timings."""

import concurrent.futures as cf
import os
import signal
import time

import pytest

import tasks
from support import wait_for

pytest.importorskip("IPython")

from jupyter_ext.run import MapRun  # noqa: E402
from miniray.client.observe import ClusterView  # noqa: E402

pytestmark = pytest.mark.timeout(120)

COUNTS = ("done", "failed", "cancelled", "running", "queued")


def _readers(run, view):
    """The counts of ``run``'s job as each reader sees it."""
    (job,) = [j for j in view.jobs() if j["job"] == run.job]
    return {"MapRun.progress()": {k: run.progress()[k] for k in COUNTS},
            "Executor.progress()": {k: run.executor.progress()[k] for k in COUNTS},
            "ClusterView.jobs()": {k: job[k] for k in COUNTS}}, job


def _futures(run):
    """The item futures' outcomes, counted."""
    out = {k: 0 for k in COUNTS}
    for f in run.futures:
        assert f.done(), "an item's future never settled"
        if f.cancelled():
            out["cancelled"] += 1
        elif f.exception() is not None:
            out["failed"] += 1
        else:
            out["done"] += 1
    return out


def test_readers_agree_after_a_map_with_failures(two_workers):
    view = ClusterView(two_workers.url)
    run = MapRun(tasks.fail_every, range(24), job_name="some fail", chunksize=3, view="text")
    try:
        run.wait(60)
        run.settle(timeout=30)
        expected = {"done": 18, "failed": 6, "cancelled": 0, "running": 0, "queued": 0}
        assert [w["busy"] for w in run.model.snapshot()["workers"]] == [0, 0]
        assert _futures(run) == expected
        readers, job = _readers(run, view)
        assert all(counts == expected for counts in readers.values()), readers
        assert job["status"] == "failed" and run.progress()["state"] == "failed", job
        # each worker's tasks_done is counted as outcomes are recorded, not a heartbeat later
        assert sum(w["tasks_done"] for w in view.workers()) == 24, view.workers()
    finally:
        view.close()


@pytest.mark.parametrize("how", ["MapRun.cancel", "Executor.cancel"])
def test_a_cancelled_map_counts_its_interrupted_items_as_cancelled(two_workers, how):
    """Running items get SIGINT: their futures end cancelled (not failed with
    KeyboardInterrupt, nor left running forever), every reader counts them as cancelled,
    nothing stays running and the workers' lanes go idle."""
    view = ClusterView(two_workers.url)
    run = MapRun(tasks.sleep_then, [0.05] * 2 + [60.0] * 8, job_name="stopped", view="text")
    try:
        wait_for(lambda: run.progress()["done"] == 2 and run.executor.progress()["running"] > 0,
                 timeout=30, what="two items done and the others running")
        if how == "MapRun.cancel":
            run.cancel()
        else:
            run.executor.cancel()
        done, pending = cf.wait(run.futures, timeout=30)
        assert not pending, [f._state for f in pending]
        run.wait(30)
        run.settle(timeout=30)
        expected = {"done": 2, "failed": 0, "cancelled": 8, "running": 0, "queued": 0}
        assert _futures(run) == expected
        assert run.results()[:2] == [None, None] and not run.errors
        readers, job = _readers(run, view)
        assert all(counts == expected for counts in readers.values()), readers
        assert job["status"] == "cancelled" and run.progress()["state"] == "cancelled"
        # the widget's lanes end idle, as the workers are
        assert [w["busy"] for w in run.model.snapshot()["workers"]] == [0, 0]
        wait_for(lambda: all(w["busy"] == 0 for w in view.workers()), timeout=30,
                 what="the workers' lanes to go idle")
        run.executor.shutdown()
        readers, job = _readers(run, view)  # the job's end leaves the counts as they are
        assert all(counts == expected for counts in readers.values()), readers
        assert job["status"] == "cancelled"
    finally:
        view.close()
        run.executor.shutdown(wait=False, cancel_futures=True)


def test_a_chunk_rerun_after_its_worker_died_is_counted_once(cluster, monkeypatch):
    """A worker that reported part of a chunk dies; the chunk runs again elsewhere. The job's
    counters (read before the executor's end writes its own tally) count each item once."""
    monkeypatch.setenv("MINIRAY_WORKER_DEAD_SECONDS", "2")
    cluster.env_extra["MINIRAY_WORKER_DEAD_SECONDS"] = "2"
    victim = cluster.start_worker(name="victim")
    with cluster.executor() as ex:
        results = ex.map(tasks.sleep_then, [0.3] * 6, range(6), chunksize=6)
        wait_for(lambda: ex.progress()["done"] >= 2, timeout=30,
                 what="a part of the chunk reported")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(10)
        cluster.start_worker(name="rescuer")
        assert list(results) == list(range(6))
        p = ex.progress()
        assert (p["done"], p["failed"], p["running"], p["queued"]) == (6, 0, 0, 0), p


def test_heartbeats_carry_each_workers_own_cpu_and_memory(two_workers):
    """proc_cpu_percent/proc_rss: the worker and its task processes, not the machine's."""
    view = ClusterView(two_workers.url)
    try:
        with two_workers.executor() as ex:
            f = ex.submit(tasks.burn, 20.0, 300)

            def seen():
                ws = {w["busy"]: w for w in view.workers()}
                return (len(ws) == 2 and ws[1]["proc_rss"] > ws[0]["proc_rss"] + 200 * 2**20
                        and ws[1]["proc_cpu_percent"] > ws[0]["proc_cpu_percent"] + 20)

            wait_for(seen, timeout=30, what="the busy worker's heartbeat to show its task")
            for w in view.workers():
                assert 0 < w["proc_rss"] < w["ram_total"] and w["proc_cpu_percent"] >= 0, w
            busy, idle = sorted(view.workers(), key=lambda w: -w["busy"])
            assert busy["ram_used"] > 0 and idle["ram_total"] == busy["ram_total"]
            f.cancel()
            ex.cancel()
    finally:
        view.close()


def test_each_item_has_its_own_timing(two_workers):
    view = ClusterView(two_workers.url)
    before = time.time()
    run = MapRun(tasks.sleep_then, [0.02] * 30, job_name="timed", chunksize=4, view="text")
    try:
        assert run.result(timeout=60) == [None] * 30
        after = time.time()
        timings = run.timings()
        assert [t.item for t in timings] == list(range(30))
        workers = {w["id"] for w in view.workers()}
        lanes = {}
        for t in timings:
            assert before <= t.start <= t.end <= after, t
            assert t.end - t.start >= 0.015, t  # its own time, not the chunk's spread evenly
            assert t.worker in workers and t.slot == 0, t
            lanes.setdefault((t.worker, t.slot), []).append(t)
        for items in lanes.values():  # one slot runs one item at a time
            items.sort(key=lambda t: t.start)
            for a, b in zip(items, items[1:]):
                assert a.end <= b.start, (a, b)
        with two_workers.executor() as ex:
            f = ex.submit(tasks.sleep_then, 0.05, 1)
            assert f.result(timeout=30) == 1
            assert f.worker in workers and f.slot == 0 and f.host
            assert before <= f.started_at <= f.finished_at - 0.04 <= time.time()
    finally:
        view.close()
