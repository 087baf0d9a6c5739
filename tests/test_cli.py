"""The ``miniray`` command against real servers and workers."""

import concurrent.futures as cf
import os
import subprocess
import sys

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


def test_status_lists_workers_and_jobs(cluster):
    cluster.start_worker(name="statw")
    with cluster.executor(job_name="status-job") as ex:
        assert ex.submit(tasks.square, 3).result(timeout=30) == 9
        out = _cli(cluster, "status")
    assert "workers: 1" in out and "statw" in out
    assert "status-job" in out and "done=1" in out


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
        cf.wait([blocker], timeout=30)
        done, pending = cf.wait(queued, timeout=15)
        assert not pending, "a future of a cancelled job never completed"
        assert all(f.cancelled() for f in queued), [(f._state, f._exception) for f in queued]
    finally:
        ex.shutdown(cancel_futures=True)
    assert not queued_runs.exists()
