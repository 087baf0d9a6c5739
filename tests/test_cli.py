"""The ``miniray`` command against real servers and workers."""

import concurrent.futures as cf
import os
import re
import subprocess
import sys
import time

import pytest

import tasks
from support import ROOT, TESTS, wait_for as _wait_for

pytestmark = pytest.mark.timeout(60)


def _cli(cluster, *args):
    env = dict(os.environ)
    env["MINIRAY_REDIS_URL"] = cluster.url
    env["MINIRAY_NAMESPACE"] = cluster.namespace
    out = subprocess.run([sys.executable, "-m", "miniray.cli", *args], env=env,
                         capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_up_prints_a_url_that_works():
    env = {k: v for k, v in os.environ.items() if k not in ("MINIRAY_REDIS_URL",
                                                            "MINIRAY_NAMESPACE")}
    env["PYTHONPATH"] = os.pathsep.join([TESTS, ROOT, env.get("PYTHONPATH", "")])
    p = subprocess.Popen([sys.executable, "-m", "miniray.cli", "up", "-n", "1"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        url = None
        for line in p.stdout:
            if line.startswith("MINIRAY_REDIS_URL="):
                url = line.strip().split("=", 1)[1]
                break
        assert url, p.stderr.read()
        import miniray

        with miniray.Executor(redis_url=url) as ex:
            assert ex.submit(tasks.square, 5).result(timeout=30) == 25
    finally:
        p.terminate()
        assert p.wait(20) == 0
        p.stdout.close()
        p.stderr.close()


def _rows(out, header):
    """The rows of the table under ``header`` (its first column's title), as cell lists."""
    lines = out.splitlines()
    at = next(i for i, ln in enumerate(lines) if ln.split()[:1] == [header])
    rows = []
    for ln in lines[at + 1:]:
        if ln.startswith("      "):  # a worker's GPU or Triton line
            continue
        if not ln.startswith("  "):
            break
        rows.append(re.split(r"\s{2,}", ln.strip()))
    return rows


def test_status_lists_workers_and_jobs(cluster):
    cluster.start_worker(name="statw")
    with cluster.executor(job_name="status-job") as ex:
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9
        out = _cli(cluster, "status")
    assert "workers: 1" in out and "statw" in out
    (job,) = _rows(out, "JOB")
    assert job[:8] == [ex.job_id, "'status-job'", "running", "0", "0", "1", "0", "0"] or \
        job[:8] == [ex.job_id, "'status-job'", "done", "0", "0", "1", "0", "0"], out


def test_status_says_each_jobs_state_in_words_with_start_and_duration(cluster, tmp_path):
    """`miniray status`: per job its id, name, state as users say it (done, failed,
    cancelled, running, queued: never the server's open/closing/orphaned), its counters, its
    start (local time) and how long it ran; per worker the items it finished."""
    cluster.start_worker(name="wordw")
    before = time.time()
    with cluster.executor(job_name="all good") as ex:
        assert list(ex.map(tasks.square, range(4))) == [0, 1, 4, 9]
    with cluster.executor(job_name="some fail") as ex:
        fs = [ex.submit(tasks.raise_value_error, x) for x in (1, 3)]
        cf.wait(fs, timeout=30)
    ex = cluster.executor(job_name="stopped")
    blocker = ex.submit(tasks.sleep_then, 30)
    queued = [ex.submit(tasks.square, i) for i in range(3)]
    _wait_for(lambda: ex.progress()["running"] == 1, what="the blocker to run")
    running = {r[0]: r for r in _rows(_cli(cluster, "status"), "JOB")}
    ex.cancel()
    cf.wait([blocker, *queued], timeout=30)
    ex.shutdown()
    out = _cli(cluster, "status")
    jobs = {r[0]: r for r in _rows(out, "JOB")}
    assert len(jobs) == 3, out
    rows = sorted(jobs.values(), key=lambda r: r[1])
    # id, name, state, queued, running, done, failed, cancelled, started, duration
    assert [r[1:8] for r in rows] == [
        ["'all good'", "done", "0", "0", "4", "0", "0"],
        ["'some fail'", "failed", "0", "0", "1", "1", "0"],
        ["'stopped'", "cancelled", "0", "0", "0", "0", "4"]], out
    assert running[ex.job_id][2:5] == ["running", "3", "1"], running
    seconds = range(int(before) - 1, int(time.time()) + 2)
    started = {time.strftime("%H:%M:%S", time.localtime(t)) for t in seconds}
    for r in rows:
        assert re.fullmatch(r"[0-9a-f]{12}\.\d+", r[0]), r
        assert r[8] in started, (r, sorted(started))
        assert re.fullmatch(r"\d+\.\ds", r[9]) and float(r[9][:-1]) < 60, r
    (worker,) = _rows(out, "NAME")
    assert worker[0] == "wordw" and worker[2] == "0/1" and worker[3] == "6", out


def test_logs_prints_the_jobs_lines(cluster):
    cluster.start_worker(name="logw")
    with cluster.executor(job_name="logs-job") as ex:
        assert ex.submit(tasks.chatty, 2, "hello").result(timeout=30) == 2
        out = _cli(cluster, "logs", "logs-job")
    assert "logw[0] stdout: hello 0" in out
    assert "hello 1" in out and "to stderr" in out and "a logging record" in out


def test_cancel_drops_queued_tasks(cluster, tmp_path):
    cluster.start_worker(name="cw")
    started, queued_runs = tmp_path / "started.txt", tmp_path / "queued.txt"
    ex = cluster.executor(job_name="cancel-job")
    try:
        blocker = ex.submit(tasks.record_run, str(started), "blocker", 3.0)
        _wait_for(lambda: started.exists(), what="the blocker to start")
        queued = [ex.submit(tasks.record_run, str(queued_runs), i) for i in range(3)]
        _wait_for(lambda: ex.progress()["queued"] == 3, what="three queued tasks")
        out = _cli(cluster, "cancel", "cancel-job")
        assert "cancelled job" in out
        assert ex.progress()["state"] == "cancelled"
        done, pending = cf.wait([blocker, *queued], timeout=15)
        assert not pending, "a future of a cancelled job never completed"
        # the running task was interrupted: cancelled, as the queued ones, and counted so
        assert all(f.cancelled() for f in [blocker, *queued]), \
            [(f._state, f._exception) for f in [blocker, *queued]]
        p = ex.progress()
        assert (p["cancelled"], p["done"], p["failed"], p["running"], p["queued"]) == \
            (4, 0, 0, 0, 0), p
    finally:
        ex.shutdown(cancel_futures=True)
    assert not queued_runs.exists()
