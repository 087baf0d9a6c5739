"""Check miniray's GPU path on this machine: NVML discovery, one CUDA task through
``Limits(gpus=1)``, the ``CUDA_VISIBLE_DEVICES`` it got, and the per-GPU telemetry the workers'
heartbeats carried (with the job holding the GPU while the task ran).

    python bench/gpu_check.py [--seconds 4]

The task uses the first GPU library it can: torch, cupy, numba, else the CUDA driver itself
(libcuda through ctypes), else NVML; it prints which. CUDA must see exactly one device, the one
NVML knows by the index or UUID in ``CUDA_VISIBLE_DEVICES`` (same UUID). It prints which GPUs
the workers own and why (``--gpus``, the ``CUDA_VISIBLE_DEVICES`` they were started with, or
NVML's list): run it as ``CUDA_VISIBLE_DEVICES=GPU-... python bench/gpu_check.py`` to check
a worker inside an allocation. Without a GPU it prints
"no GPU here: NVML unavailable (...)" after showing the CPU-only path (a ``Limits(gpus=0)`` task
sees ``CUDA_VISIBLE_DEVICES=""``) and exits 0. Exit status 1 means a check failed.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

import miniray
from miniray.worker import gpu
from miniray.client.observe import format_bytes, format_gpu, gpu_jobs


# -- what runs in the task (pickled by value: this file is __main__) -----------------------------
def visible_devices():
    return os.environ.get("CUDA_VISIBLE_DEVICES")


def _uuid(raw) -> str | None:
    """A GPU UUID as NVML writes it (``GPU-xxxxxxxx-xxxx-...``), from bytes or text."""
    if raw is None:
        return None
    if isinstance(raw, (bytes, bytearray)) and len(raw) == 16:
        h = bytes(raw).hex()
        return f"GPU-{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"
    text = raw.decode() if isinstance(raw, bytes) else str(raw)
    return text if text.startswith(("GPU-", "MIG-")) else f"GPU-{text}"


def _busy(seconds, step):
    """Run ``step`` until ``seconds`` passed (so the heartbeats see the GPU busy); count it."""
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        step()
        n += 1
    return n


def _torch(seconds):
    import torch

    if not torch.cuda.is_available():
        raise RuntimeError("torch.cuda.is_available() is False")
    x = torch.randn(4096, 4096, device="cuda:0")
    n = _busy(seconds, lambda: (x @ x, torch.cuda.synchronize()))
    props = torch.cuda.get_device_properties(0)
    return {"count": torch.cuda.device_count(), "device": props.name,
            "uuid": _uuid(getattr(props, "uuid", None)), "work": f"{n} fp32 4096^2 matmuls"}


def _cupy(seconds):
    import cupy as cp

    count = cp.cuda.runtime.getDeviceCount()
    x = cp.random.random((4096, 4096), dtype=cp.float32)
    n = _busy(seconds, lambda: (x @ x, cp.cuda.Device(0).synchronize()))
    props = cp.cuda.runtime.getDeviceProperties(0)
    name = props["name"]
    return {"count": count, "device": name.decode() if isinstance(name, bytes) else name,
            "uuid": _uuid(props.get("uuid")), "work": f"{n} fp32 4096^2 matmuls"}


def _numba(seconds):
    import numpy as np
    from numba import cuda

    if not cuda.is_available():
        raise RuntimeError("numba.cuda.is_available() is False")

    @cuda.jit
    def inc(a):
        i = cuda.grid(1)
        if i < a.size:
            a[i] += 1.0

    a = cuda.to_device(np.zeros(1 << 24, dtype=np.float32))
    n = _busy(seconds, lambda: (inc[(a.size + 255) // 256, 256](a), cuda.synchronize()))
    dev = cuda.get_current_device()
    name = dev.name.decode() if isinstance(dev.name, bytes) else dev.name
    return {"count": len(cuda.gpus), "device": name, "uuid": _uuid(getattr(dev, "uuid", None)),
            "work": f"{n} kernel launches over 16M floats"}


def _driver(seconds):
    """The CUDA driver API: it honours CUDA_VISIBLE_DEVICES as every CUDA library does."""
    import ctypes

    lib = ctypes.CDLL("libcuda.so.1")

    def check(rc, what):
        if rc != 0:
            raise RuntimeError(f"{what} failed with CUresult {rc}")

    check(lib.cuInit(0), "cuInit")
    count, dev = ctypes.c_int(), ctypes.c_int()
    check(lib.cuDeviceGetCount(ctypes.byref(count)), "cuDeviceGetCount")
    check(lib.cuDeviceGet(ctypes.byref(dev), 0), "cuDeviceGet")
    name, uuid = ctypes.create_string_buffer(256), (ctypes.c_ubyte * 16)()
    check(lib.cuDeviceGetName(name, 256, dev), "cuDeviceGetName")
    check(lib.cuDeviceGetUuid(uuid, dev), "cuDeviceGetUuid")
    ctx, ptr = ctypes.c_void_p(), ctypes.c_uint64()
    check(lib.cuDevicePrimaryCtxRetain(ctypes.byref(ctx), dev), "cuDevicePrimaryCtxRetain")
    check(lib.cuCtxSetCurrent(ctx), "cuCtxSetCurrent")
    check(lib.cuMemAlloc_v2(ctypes.byref(ptr), ctypes.c_size_t(512 << 20)), "cuMemAlloc")
    time.sleep(seconds)  # 512 MiB held: NVML's memory figure shows it
    lib.cuMemFree_v2(ptr)
    lib.cuDevicePrimaryCtxRelease(dev)
    return {"count": count.value, "device": name.value.decode(), "uuid": _uuid(bytes(uuid)),
            "work": "512 MiB allocated with cuMemAlloc"}


def _nvml(seconds):
    """Last resort: NVML lists every GPU of the node (it ignores CUDA_VISIBLE_DEVICES), so
    only the index can be checked, not what CUDA would see."""
    import pynvml

    pynvml.nvmlInit()
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    h = pynvml.nvmlDeviceGetHandleByIndex(int(visible.split(",")[0]))
    time.sleep(seconds)
    name = pynvml.nvmlDeviceGetName(h)
    return {"count": None, "device": name.decode() if isinstance(name, bytes) else name,
            "uuid": _uuid(pynvml.nvmlDeviceGetUUID(h)), "work": "none (NVML cannot run work)"}


def cuda_task(seconds):
    """Use the GPU this task was given for ``seconds``; say how, and what CUDA saw."""
    out = {"cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "skipped": []}
    for path, probe in (("torch", _torch), ("cupy", _cupy), ("numba", _numba),
                        ("cuda-driver", _driver), ("nvml", _nvml)):
        try:
            out.update(probe(seconds), path=path)
            return out
        except Exception as e:  # noqa: BLE001 -- not installed, no CUDA build: try the next
            out["skipped"].append(f"{path}: {type(e).__name__}: {e}")
    out["path"] = None
    return out


# -- the driver ---------------------------------------------------------------------------------
def nvml_status():
    """(GPU count, None) when NVML works here, else (0, why not)."""
    try:
        import pynvml
    except ImportError as e:
        return 0, f"ImportError: {e}; pip install nvidia-ml-py"
    try:
        pynvml.nvmlInit()
        return pynvml.nvmlDeviceGetCount(), None
    except Exception as e:  # noqa: BLE001 -- NVMLError_LibraryNotFound without a driver
        return 0, f"{type(e).__name__}: {e}"


def nvml_uuid(index):
    import pynvml

    return _uuid(pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(index)))


def print_gpus(ex, title):
    print(title)
    for w in ex.workers():
        gpus = w.get("gpus") or []
        print(f"  {w.get('name')}: {len(gpus) or 'no'} GPU(s)")
        if w.get("gpu_note"):  # which GPUs it owns and why: --gpus, CUDA_VISIBLE_DEVICES, NVML
            print(f"    owns: {w['gpu_note']}")
        for g in gpus:
            print(f"    {format_gpu(g)}")


def watch(ex, fut):
    """Poll the heartbeats while ``fut`` runs: the GPU lines naming this job, one per beat."""
    held, last_seen = [], {}
    while not fut.done():
        for w in ex.workers():
            for g in w.get("gpus") or []:
                if ex.job_id in gpu_jobs(g) and last_seen.get(w["id"]) != w.get("seen"):
                    held.append((w.get("name"), g))
            last_seen[w["id"]] = w.get("seen")
        time.sleep(0.2)
    return held


def check(ok, what, failures):
    print(f"  {'ok  ' if ok else 'FAIL'} {what}")
    if not ok:
        failures.append(what)


def gpu_path(cluster, seconds, failures):
    with miniray.Executor(redis_url=cluster.url, job_name="gpu-check",
                          limits=miniray.Limits(gpus=1)) as ex:
        print_gpus(ex, "heartbeats before the task:")
        fut = ex.submit(cuda_task, seconds)
        held = watch(ex, fut)
        res = fut.result(timeout=seconds + 300)
        print(f"GPU task (Limits(gpus=1)), job {ex.job_id}:")
        print(f"  path: {res['path'] or 'none worked'}"
              + (f"  ({res['work']})" if res.get("work") else ""))
        for why in res["skipped"]:
            print(f"  skipped {why}")
        visible = res["cuda_visible_devices"]
        print(f"  CUDA_VISIBLE_DEVICES={visible!r}")
        if res["path"] is not None:
            seen = "?" if res.get("count") is None else res["count"]
            print(f"  {res['path']} sees {seen} device(s): {res.get('device')} "
                  f"{res.get('uuid') or ''}")
        # an index, or the UUID the worker was given in its CUDA_VISIBLE_DEVICES
        one = bool(visible) and "," not in visible
        check(one, "the task got exactly one GPU", failures)
        check(res["path"] is not None, "a GPU library ran in the task", failures)
        if res.get("count") is not None:
            check(res["count"] == 1, "CUDA sees exactly one device", failures)
        if one and res.get("uuid") and (visible.isdigit() or visible.startswith("GPU-")):
            want = nvml_uuid(int(visible)) if visible.isdigit() else visible
            check(res["uuid"].lower() == want.lower(),
                  f"it is NVML's GPU {visible} ({want}); if not, set CUDA_DEVICE_ORDER=PCI_BUS_ID",
                  failures)
        print(f"heartbeats while the task ran ({len(held)} naming job {ex.job_id}):")
        for name, g in held[-3:]:
            print(f"  {name}: {format_gpu(g)}")
        if held:
            util = [g["util"] for _, g in held if g.get("util") is not None]
            mem = [g["mem_used"] for _, g in held if g.get("mem_used") is not None]
            if util or mem:
                print(f"  while held: util max {max(util, default=0)}%, memory max "
                      f"{format_bytes(max(mem, default=0))}")
        mine = held[-1][1] if held else {}
        check(bool(held) and (not one or str(mine.get("index")) == visible
                              or (mine.get("uuid") or "").lower() == visible.lower()),
              "a heartbeat named this job on the task's GPU (raise --seconds if not)", failures)
        deadline = time.monotonic() + 5  # the next heartbeat shows the GPU free again
        while time.monotonic() < deadline and any(
                ex.job_id in gpu_jobs(g) for w in ex.workers() for g in w.get("gpus") or []):
            time.sleep(0.2)
        print_gpus(ex, "heartbeats after the task:")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=4.0,
                   help="how long the task keeps the GPU busy (heartbeats come once a second)")
    args = p.parse_args(argv)

    count, why = nvml_status()
    cvd = os.environ.get("CUDA_VISIBLE_DEVICES")
    print(f"CUDA_VISIBLE_DEVICES here: {'(unset)' if cvd is None else repr(cvd)}")
    print(f"GPUs a worker started here owns: {gpu.own().note}")
    cluster = miniray.init(workers=1)
    failures: list = []
    try:
        with miniray.Executor(redis_url=cluster.url, job_name="gpu-check-cpu",
                              limits=miniray.Limits(gpus=0)) as ex:
            cuda = ex.submit(visible_devices).result(timeout=120)
            print(f"CPU-only task (Limits(gpus=0)): CUDA_VISIBLE_DEVICES={cuda!r}")
            check(cuda == "", "a task without GPUs sees none", failures)
            print_gpus(ex, "heartbeats:")
        if not count:
            reason = f"NVML unavailable ({why})" if why else "NVML sees 0 GPUs"
            print(f"no GPU here: {reason}; the CPU-only path above is all there is to check")
        else:
            gpu_path(cluster, args.seconds, failures)
    finally:
        miniray.shutdown()
    print("all checks passed" if not failures else f"{len(failures)} check(s) FAILED")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
