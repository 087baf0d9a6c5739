"""GPU workers inside allocations: a worker started with ``CUDA_VISIBLE_DEVICES`` (indices,
UUIDs, MIG instances) and/or ``--gpus`` owns exactly those GPUs, maps them to NVML's, reports
their telemetry field by field and gives tasks the right names. There is no GPU here: NVML is
a small device table (tests/fakenvml) put where ``miniray.worker.gpu`` reaches pynvml; the workers,
the server and the tasks are real."""

import json
import os
import subprocess
import sys

import pytest

import miniray
import tasks
from miniray.worker import gpu
from miniray.errors import ConfigurationError
from support import ROOT, TESTS, wait_for


def _load_fake():
    """tests/fakenvml/pynvml.py under another name (the real pynvml stays what it is here)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "fake_pynvml", os.path.join(TESTS, "fakenvml", "pynvml.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


DeviceTable = _load_fake().DeviceTable

pytestmark = pytest.mark.timeout(60)

GiB = 2**30
DEVICES = [
    {"uuid": f"GPU-{c * 8}-0000-0000-0000-{c * 12}", "bus_id": f"00000000:{0x3B + i:02X}:00.0",
     "name": "NVIDIA A100", "util": 10 * (i + 1), "mem_used": i * GiB, "mem_total": 80 * GiB,
     "temp": 40 + i}
    for i, c in enumerate("abcd")
]
UUID = [d["uuid"] for d in DEVICES]
MIG = {"uuid": "MIG-eeeeeeee-0000-0000-0000-eeeeeeeeeeee", "name": "NVIDIA A100 MIG 1g.10gb",
       "util": "error", "mem_used": GiB, "mem_total": 10 * GiB, "temp": "error"}


@pytest.fixture
def nvml():
    """A four-GPU node's NVML, for this test only."""
    saved = dict(gpu._nvml_state)
    table = DeviceTable(DEVICES, mig=[MIG])
    gpu._use_nvml(table)
    yield table
    gpu._nvml_state.clear()
    gpu._nvml_state.update(saved)


def test_indices_in_cuda_visible_devices_are_exactly_the_gpus_owned(nvml):
    o = gpu.own(None, {"CUDA_VISIBLE_DEVICES": "2,3"})
    assert o.source == "CUDA_VISIBLE_DEVICES" and o.ids == [2, 3]
    assert [g.uuid for g in o.gpus] == UUID[2:]
    assert gpu.visible_devices([3], {g.id: g.name for g in o.gpus}) == "3"
    t = gpu.telemetry(o.gpus)
    assert [(g["index"], g["uuid"], g["util"]) for g in t] == [(2, UUID[2], 30), (3, UUID[3], 40)]
    assert "CUDA_VISIBLE_DEVICES='2,3'" in o.note
    # without the variable the worker owns every GPU NVML lists
    assert gpu.own(None, {}).ids == [0, 1, 2, 3] and gpu.own(None, {}).source == "NVML"


def test_uuids_map_to_nvml_gpus_and_tasks_get_the_same_uuids(nvml):
    cvd = f"{UUID[3]},{UUID[1][:12]}"  # CUDA takes a unique prefix too
    o = gpu.own(None, {"CUDA_VISIBLE_DEVICES": cvd})
    assert o.ids == [3, 1] and [g.uuid for g in o.gpus] == [UUID[3], UUID[1]]
    names = {g.id: g.name for g in o.gpus}
    assert gpu.visible_devices([1, 3], names) == f"{UUID[1][:12]},{UUID[3]}"
    t = gpu.telemetry(o.gpus)
    assert [(g["index"], g["mem_used"], g["temp"]) for g in t] == [(3, 3 * GiB, 43), (1, GiB, 41)]
    assert ("temp", UUID[0]) not in nvml.calls  # nothing read of a GPU not owned


def test_mig_instances_and_cuda_s_reading_of_the_variable(nvml):
    o = gpu.own(None, {"CUDA_VISIBLE_DEVICES": MIG["uuid"]})
    assert [g.name for g in o.gpus] == [MIG["uuid"]] and o.ids == [4]  # after NVML's indices
    (t,) = gpu.telemetry(o.gpus)
    assert t["mem_total"] == 10 * GiB and "util" not in t  # a MIG instance has no utilisation
    # as CUDA: what follows an invalid entry is ignored; empty means no GPU
    o = gpu.own(None, {"CUDA_VISIBLE_DEVICES": "1,-1,3"})
    assert o.ids == [1] and "'-1,3' ignored" in o.note
    assert gpu.own(None, {"CUDA_VISIBLE_DEVICES": ""}).ids == []
    assert gpu.own(None, {"CUDA_VISIBLE_DEVICES": "NoDevFiles"}).ids == []


def test_gpus_flag_wins_but_stays_inside_the_allocation(nvml):
    env = {"CUDA_VISIBLE_DEVICES": "2,3"}
    assert gpu.own("3", env).ids == [3] and gpu.own("3", env).source == "--gpus"
    assert gpu.own(UUID[2], env).ids == [2]  # a UUID for an index of the allocation
    assert gpu.own("0000:3E:00.0", env).ids == [3]  # a PCI bus id: task gets the UUID
    assert gpu.own("3e:00.0", env).gpus[0].name == UUID[3]
    assert gpu.own("none", env).ids == []
    with pytest.raises(ConfigurationError, match=r"--gpus 0: 0 is not among the GPUs .*"
                       r"CUDA_VISIBLE_DEVICES=2,3.*never relative"):
        gpu.own("0", env)
    with pytest.raises(ConfigurationError, match=r"--gpus '0000:99:00.0': no such GPU; NVML "
                       r"lists 0 \("):
        gpu.own("0000:99:00.0", {})
    o = gpu.own("7", {})  # not one NVML lists (a simulated GPU): kept, said, no telemetry
    assert o.ids == [7] and "7 is not one NVML lists" in o.note
    assert gpu.telemetry(o.gpus) == [{"index": 7}]
    assert gpu.own("0,1", {}).ids == [0, 1]  # no allocation: any GPU NVML lists


def test_one_failing_nvml_field_keeps_the_others(nvml):
    nvml.devices[1]["temp"] = "error"  # a board that does not report its temperature
    nvml.devices[2]["util"] = "error"
    t = {g["index"]: g for g in gpu.telemetry(gpu.own("1,2", {}).gpus)}
    assert t[1]["util"] == 20 and t[1]["mem_used"] == GiB and t[1]["name"] == "NVIDIA A100"
    assert "temp" not in t[1]
    assert t[2]["temp"] == 42 and t[2]["mem_total"] == 80 * GiB and "util" not in t[2]
    assert gpu.memory_totals(gpu.own("1,2", {}).gpus) == {1: 80 * 1024, 2: 80 * 1024}


def _fake_node_env(cvd, devices=DEVICES):
    return {"PYTHONPATH": os.pathsep.join([os.path.join(TESTS, "fakenvml"), TESTS, ROOT]),
            "FAKE_NVML_DEVICES": json.dumps(devices), "CUDA_VISIBLE_DEVICES": cvd}


def test_a_worker_in_an_allocation_of_uuids_owns_those_and_tasks_see_them(cluster):
    devices = [dict(d) for d in DEVICES]
    devices[3]["temp"] = "error"
    cluster.start_worker("--slots", "2", extra_env=_fake_node_env(f"{UUID[3]},{UUID[1]}",
                                                                  devices))
    (w,) = cluster.workers()
    assert sorted((g["index"], g["uuid"]) for g in w["gpus"]) == [(1, UUID[1]), (3, UUID[3])]
    g3 = next(g for g in w["gpus"] if g["index"] == 3)
    assert g3["mem_total"] == 80 * GiB and g3["util"] == 40 and "temp" not in g3
    assert "CUDA_VISIBLE_DEVICES=" in w["gpu_note"]
    with cluster.executor(limits=miniray.Limits(gpus=2)) as ex:
        assert ex.submit(tasks.where).result(timeout=30)["cuda"] == f"{UUID[1]},{UUID[3]}"
    with cluster.executor(limits=miniray.Limits(gpus=1)) as ex:
        seen = {ex.submit(tasks.where).result(timeout=30)["cuda"] for _ in range(4)}
        assert seen <= {UUID[1], UUID[3]} and seen


def test_a_worker_given_indices_and_gpus_owns_their_overlap_or_refuses(cluster):
    # no NVML here at all (the real pynvml, no driver): indices are taken as given
    cluster.start_worker("--gpus", "3", extra_env={"CUDA_VISIBLE_DEVICES": "2,3"})
    (w,) = cluster.workers()
    assert [g["index"] for g in w["gpus"]] == [3] and "--gpus 3" in w["gpu_note"]
    with cluster.executor(limits=miniray.Limits(gpus=1)) as ex:
        assert ex.submit(tasks.where).result(timeout=30)["cuda"] == "3"
    bad = cluster.start_worker("--gpus", "0", name="outside", wait=False,
                               extra_env={"CUDA_VISIBLE_DEVICES": "2,3"})
    assert bad.wait(30) == 2
    wait_for(lambda: "not among the GPUs" in bad.log_path.read_text(), what="the reason")


_LOCAL = """
import json, os, time
import miniray
cluster = miniray.init(workers=3)
ex = miniray.Executor(limits=miniray.Limits(gpus=1))
deadline = time.monotonic() + 30
while len(ex.workers()) < 3 and time.monotonic() < deadline:
    time.sleep(0.1)
owned = {w["name"]: ([g["index"] for g in w["gpus"]], w["slots"]) for w in ex.workers()}
def hold():
    time.sleep(1.5)
    return os.environ.get("CUDA_VISIBLE_DEVICES")
held = [f.result(timeout=60) for f in [ex.submit(hold) for _ in range(2)]]
print(json.dumps({"owned": owned, "held": held}))
ex.shutdown()
"""


def test_the_local_clusters_gpus_belong_to_one_worker_so_no_gpu_is_handed_out_twice():
    """Three local workers on a machine with two GPUs: local-0 owns both (a slot each), the
    others none, so two GPU tasks at once get one GPU each (every worker owning both would
    give GPU 0 to both)."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="0,1",  # no NVML here: taken as given
               PYTHONPATH=os.pathsep.join([TESTS, ROOT]))
    env.pop("MINIRAY_REDIS_URL", None)
    out = subprocess.run([sys.executable, "-c", _LOCAL], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["owned"] == {"local-0": [[0, 1], 2], "local-1": [[], 1], "local-2": [[], 1]}
    assert sorted(got["held"]) == ["0", "1"]
