"""GPU placement without a GPU: workers are given ``--gpus`` explicitly (no NVML here), and
tasks report the ``CUDA_VISIBLE_DEVICES`` they were started with."""

import time

import pytest

import miniray
import tasks
from support import wait_for

pytestmark = pytest.mark.timeout(90)


def _started(d):
    return {p.name[len("started-"):]: p.read_text() for p in d.glob("started-*")}


def test_gpu_memory_gb_packs_tasks_on_one_gpu_while_they_fit(cluster, tmp_path):
    cluster.start_worker("--gpus", "0", "--gpu-memory", "10", "--slots", "3", name="pack")
    with cluster.executor(limits=miniray.Limits(gpu_memory_gb=4)) as ex:
        futures = [ex.submit(tasks.gate, str(tmp_path), i) for i in range(3)]
        wait_for(lambda: len(_started(tmp_path)) == 2, timeout=30, what="two packed tasks")
        # 4 + 4 GB fit a 10 GB GPU; a third 4 GB would not: it waits in the queue
        wait_for(lambda: ex.progress()["queued"] == 1, what="the third task to stay queued")

        def reserved():
            gpus = [g for w in ex.workers() for g in w.get("gpus", [])]
            return gpus and gpus[0].get("reserved") == 8 * 2**30 \
                and gpus[0].get("jobs") == [ex.job_id] * 2
        wait_for(reserved, what="a heartbeat: 8 GiB reserved on GPU 0 by two tasks of the job")
        time.sleep(1.0)  # room for a wrong placement to show itself
        assert len(_started(tmp_path)) == 2
        (tmp_path / "go").touch()
        assert [f.result(timeout=30) for f in futures] == ["0", "0", "0"]


def test_packed_tasks_share_a_gpu_and_leave_the_other_whole(cluster, tmp_path):
    cluster.start_worker("--gpus", "0,1", "--gpu-memory", "10", "--slots", "3", name="mixed")
    packed = cluster.executor(limits=miniray.Limits(gpus=1, gpu_memory_gb=3))
    whole = cluster.executor(limits=miniray.Limits(gpus=1))
    try:
        small = [packed.submit(tasks.gate, str(tmp_path), f"p{i}") for i in range(2)]
        wait_for(lambda: len(_started(tmp_path)) == 2, timeout=30, what="two packed tasks")
        big = whole.submit(tasks.gate, str(tmp_path), "whole")
        wait_for(lambda: "whole" in _started(tmp_path), timeout=30, what="the whole-GPU task")
        seen = _started(tmp_path)
        assert seen["p0"] == seen["p1"] and {seen["p0"], seen["whole"]} == {"0", "1"}
        (tmp_path / "go").touch()
        assert {f.result(timeout=30) for f in small} == {seen["p0"]}
        assert big.result(timeout=30) == seen["whole"]
    finally:
        packed.shutdown(cancel_futures=True)
        whole.shutdown(cancel_futures=True)


def test_whole_gpu_tasks_never_share_a_gpu(cluster, tmp_path):
    cluster.start_worker("--gpus", "0", "--slots", "2", name="one")
    with cluster.executor(limits=miniray.Limits(gpus=1)) as ex:
        futures = [ex.submit(tasks.gate, str(tmp_path), i) for i in range(2)]
        wait_for(lambda: len(_started(tmp_path)) == 1, timeout=30, what="the first task")
        wait_for(lambda: ex.progress()["queued"] == 1, what="the second task to stay queued")
        time.sleep(1.0)  # room for a wrong placement to show itself
        assert len(_started(tmp_path)) == 1
        (tmp_path / "go").touch()
        assert [f.result(timeout=30) for f in futures] == ["0", "0"]


@pytest.mark.parametrize("how", ["crash", "timeout"])
def test_a_gpu_is_released_when_its_task_crashes_or_times_out(cluster, how):
    cluster.start_worker("--gpus", "0", "--slots", "2", name="one")
    lim = miniray.Limits(gpus=1, timeout_seconds=1 if how == "timeout" else None)
    with cluster.executor(limits=lim) as ex:
        bad = ex.submit(tasks.hard_exit, 3) if how == "crash" else ex.submit(tasks.sleep_then, 60)
        err = miniray.TaskCrashedError if how == "crash" else miniray.TaskTimeoutError
        with pytest.raises(err):
            bad.result(timeout=30)
        # the only GPU is free again: the next GPU tasks run (on either slot)
        assert [ex.submit(tasks.where).result(timeout=30)["cuda"] for _ in range(3)] == ["0"] * 3


def test_cpu_tasks_on_a_gpu_worker_see_no_gpu(cluster):
    cluster.start_worker("--gpus", "0,1", name="gpuw")
    with cluster.executor() as ex:
        assert ex.submit(tasks.where).result(timeout=30)["cuda"] == ""


def test_a_gpu_task_waits_for_a_worker_with_enough_gpus(cluster):
    cluster.start_worker("--gpus", "0", name="small")
    with cluster.executor(limits=miniray.Limits(gpus=2)) as ex:
        f = ex.submit(tasks.where)
        wait_for(lambda: ex.progress()["queued"] == 1, what="the task to be queued")
        time.sleep(1.0)  # the one-GPU worker must not take it
        assert not f.done()
        cluster.start_worker("--gpus", "0,1", name="big")
        assert f.result(timeout=30)["cuda"] == "0,1"
        assert f.worker.startswith("big-")
