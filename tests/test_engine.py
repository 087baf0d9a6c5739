"""Engine features against real workers: scheduling, resources, environment, observation."""

import os
import signal
import subprocess
import sys

import pytest

import miniray
import tasks
from miniray.client.observe import LogLine
from support import wait_for as _wait_for

pytestmark = pytest.mark.timeout(60)


# -- scheduling --------------------------------------------------------------------------------
def test_higher_priority_runs_first(cluster):
    # Both jobs are queued before the only worker (one slot) starts, so which job it takes
    # first depends on priority alone, not on the moment a claim happens to land.
    low = cluster.executor(priority=1, job_name="low")
    high = cluster.executor(priority=10, job_name="high")
    try:
        lows = [low.submit(tasks.stamp, 0.02, "low") for _ in range(5)]
        highs = [high.submit(tasks.stamp, 0.02, "high") for _ in range(5)]
        _wait_for(lambda: low.progress()["queued"] == 5 and high.progress()["queued"] == 5,
                  what="both jobs to be queued")
        cluster.start_worker(name="solo")
        last_high = max(f.result(timeout=30)[1] for f in highs)
        first_low = min(f.result(timeout=30)[1] for f in lows)
        assert last_high <= first_low
    finally:
        low.shutdown(cancel_futures=True)
        high.shutdown(cancel_futures=True)


def test_equal_priorities_share_fairly(cluster):
    a = cluster.executor(priority=3, job_name="a")
    b = cluster.executor(priority=3, job_name="b")
    try:
        fa = [a.submit(tasks.stamp, 0.05, "a") for _ in range(6)]
        fb = [b.submit(tasks.stamp, 0.05, "b") for _ in range(6)]
        _wait_for(lambda: a.progress()["queued"] == 6 and b.progress()["queued"] == 6,
                  what="both jobs to be queued")
        cluster.start_worker(name="solo")
        done = sorted(f.result(timeout=30) for f in fa + fb)
        order = [tag for tag, _ in sorted(done, key=lambda x: x[1])]
        first_half = order[:6]
        assert first_half.count("a") >= 2 and first_half.count("b") >= 2, order
    finally:
        a.shutdown(cancel_futures=True)
        b.shutdown(cancel_futures=True)


# -- resources ---------------------------------------------------------------------------------
def test_cpus_pin_the_task(cluster):
    cluster.start_worker(name="solo")
    with cluster.executor(limits=miniray.Limits(cpus=1)) as ex:
        info = ex.submit(tasks.where).result(timeout=30)
    assert len(info["affinity"]) == 1


def test_no_gpu_means_empty_cuda_visible_devices(cluster):
    cluster.start_worker(name="solo")
    with cluster.executor(limits=miniray.Limits(gpus=0)) as ex:
        assert ex.submit(tasks.where).result(timeout=30)["cuda"] == ""


def test_gpu_task_sees_one_of_its_workers_gpus(cluster):
    cluster.start_worker("--gpus", "0,1", name="gpuw")
    with cluster.executor(limits=miniray.Limits(gpus=1)) as ex:
        seen = {ex.submit(tasks.where).result(timeout=30)["cuda"] for _ in range(3)}
    assert seen <= {"0", "1"} and seen


def test_gpu_task_never_goes_to_a_worker_without_gpus(cluster):
    cluster.start_worker("--gpus", "none", name="cpuonly")
    cluster.start_worker("--gpus", "0", name="gpuw")
    with cluster.executor(limits=miniray.Limits(gpus=1)) as ex:
        futures = [ex.submit(tasks.where) for _ in range(4)]
        for f in futures:
            assert f.result(timeout=30)["cuda"] == "0"
            assert f.worker.startswith("gpuw-")


def test_heartbeat_tells_which_job_holds_a_gpu(cluster):
    cluster.start_worker("--gpus", "0,1", name="gpus2")
    with cluster.executor(limits=miniray.Limits(gpus=1)) as ex:
        f = ex.submit(tasks.sleep_then, 3.0, "done")

        def holder():
            for w in ex.workers():
                held = [g for g in w.get("gpus", []) if g.get("job") == ex.job_id]
                if held:
                    return held
            return None

        _wait_for(holder, timeout=10, what="a heartbeat naming the job on its GPU")
        assert len(holder()) == 1 and holder()[0]["index"] in (0, 1)
        _wait_for(lambda: (holder() or [{}])[0].get("task") == f.task_id, timeout=10,
                  what="a heartbeat naming the task running on the GPU")
        assert f.result(timeout=30) == "done"


def test_without_nvml_a_worker_runs_cpu_only_and_says_so_once(cluster):
    # this machine has no NVIDIA driver: NVML cannot start, so no GPU is claimed
    w = cluster.start_worker(name="plain")
    with cluster.executor() as ex:
        assert ex.submit(tasks.where).result(timeout=30)["cuda"] == ""
        _wait_for(lambda: any(x["name"] == "plain" for x in ex.workers()), what="a heartbeat")
        assert [x["gpus"] for x in ex.workers() if x["name"] == "plain"] == [[]]
    text = w.log_path.read_text()
    assert text.count("NVML unavailable") == 1 and "running CPU-only" in text, text


def test_nodes_whitelist(two_workers):
    with two_workers.executor(limits=miniray.Limits(nodes=["w1"])) as ex:
        futures = [ex.submit(tasks.where) for _ in range(6)]
        for f in futures:
            f.result(timeout=30)
            assert f.worker.startswith("w1-"), f.worker


def test_env_reaches_the_task_and_does_not_leak(cluster):
    cluster.start_worker(name="solo")
    with cluster.executor(env={"MINIRAY_TEST_X": "y"}) as ex:
        assert ex.submit(tasks.where).result(timeout=30)["env_x"] == "y"
    with cluster.executor() as ex:
        assert ex.submit(tasks.where).result(timeout=30)["env_x"] is None


# -- observation -------------------------------------------------------------------------------
def test_logs_events_workers_progress(cluster):
    cluster.start_worker(name="solo")
    with cluster.executor(job_name="observed") as ex:
        assert ex.submit(tasks.chatty, 2, "first").result(timeout=30) == 2
        assert ex.submit(tasks.chatty, 1, "second").result(timeout=30) == 1
        assert isinstance(ex.submit(tasks.raise_custom).exception(timeout=30), tasks.CustomError)
        lines = list(ex.logs())
        events = list(ex.events())
        workers = ex.workers()
        progress = ex.progress()
    assert lines and all(isinstance(x, LogLine) for x in lines)
    assert {x.stream for x in lines} >= {"stdout", "stderr", "logging"}
    by_text = {x.text: x for x in lines}
    assert by_text["first 0"].task == 0 and by_text["first 1"].task == 0
    assert by_text["second 0"].task == 1
    assert by_text["first 0"].worker == "solo"
    assert any("a logging record" in x.text and x.stream == "logging" for x in lines)
    kinds = [e.kind for e in events]
    assert {"queued", "started", "finished", "failed"} <= set(kinds)
    assert len(workers) == 1
    w = workers[0]
    assert w["name"] == "solo" and w["host"] and w["slots"] == 1 and "cpu_percent" in w
    assert progress["done"] == 2 and progress["failed"] == 1
    assert progress["queued"] == 0 and progress["running"] == 0


def test_module_next_to_the_notebook_travels_by_value(cluster, tmp_path):
    cluster.start_worker(name="solo")
    name = f"localmod_{os.getpid()}"
    (tmp_path / f"{name}.py").write_text(
        "FACTOR = 6\n\ndef times(x):\n    return x * FACTOR\n")
    sys.path.insert(0, str(tmp_path))
    try:
        mod = __import__(name)
        with cluster.executor() as ex:
            assert ex.submit(mod.times, 7).result(timeout=30) == 42
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop(name, None)


# -- worker security and lifecycle -------------------------------------------------------------
def test_worker_refuses_remote_server_without_password():
    env = {k: v for k, v in os.environ.items() if k != "MINIRAY_REDIS_URL"}
    out = subprocess.run([sys.executable, "-m", "miniray.worker", "--redis",
                          "redis://10.1.2.3:6379"], env=env, capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 2, out.stderr
    assert "no password" in out.stderr and "10.1.2.3" in out.stderr


def test_sigterm_hands_the_held_task_back(two_workers, tmp_path):
    runs = tmp_path / "runs.txt"
    with two_workers.executor() as ex:
        f = ex.submit(tasks.record_run, str(runs), "handed back", 1.5)
        _wait_for(lambda: runs.exists() and runs.read_text().strip(), what="the first run")
        victim_pid = int(runs.read_text().split()[0])
        victim = next(p for p in two_workers.procs if p.pid == victim_pid)
        victim.send_signal(signal.SIGTERM)
        assert victim.wait(15) == 0
        assert f.result(timeout=30) == "handed back"
    pids = runs.read_text().split()
    assert len(pids) == 2 and pids[1] != str(victim_pid)
