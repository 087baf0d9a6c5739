"""GPU discovery and telemetry through NVML (``nvidia-ml-py``); absent NVML means no GPU fields."""

from __future__ import annotations

import threading

__all__ = ["GpuPool", "discover", "memory_totals", "telemetry"]

_nvml_lock = threading.Lock()
_nvml_state: dict = {}


def _nvml():
    """The initialised pynvml module, or None (no package, no driver); tried once."""
    with _nvml_lock:
        if "mod" not in _nvml_state:
            try:
                import pynvml

                pynvml.nvmlInit()
                _nvml_state["mod"] = pynvml
            except Exception as e:  # NVMLError_LibraryNotFound without a driver, ImportError
                _nvml_state["mod"] = None
                _nvml_state["why"] = f"{type(e).__name__}: {e}"
        return _nvml_state["mod"]


def discover(spec=None) -> tuple[list[int], str]:
    """GPU indices this worker owns and a note saying how they were found.

    ``spec``: ``None`` (ask NVML), ``"none"``/``""`` (no GPUs), ``"0,1"`` or a list of ints.
    """
    if spec is not None:
        if isinstance(spec, str):
            spec = spec.strip()
            if spec.lower() in ("", "none"):
                return [], "GPUs: none (as asked)"
            try:
                ids = [int(x) for x in spec.split(",") if x.strip()]
            except ValueError:
                from .errors import ConfigurationError

                raise ConfigurationError(
                    f"--gpus {spec!r}: give GPU indices separated by commas, e.g. --gpus 0,1"
                ) from None
        else:
            ids = [int(x) for x in spec]
        return sorted(set(ids)), f"GPUs {ids} (as asked)"
    nv = _nvml()
    if nv is None:
        return [], f"no GPU: NVML unavailable ({_nvml_state.get('why')}); running CPU-only"
    n = nv.nvmlDeviceGetCount()
    return list(range(n)), f"GPUs {list(range(n))} found with NVML"


def telemetry(ids) -> list[dict]:
    """Per GPU: index, name, utilisation %, memory used/total (bytes), temperature (C).

    Without NVML only the index is known, so only the index is reported.
    """
    nv = _nvml() if ids else None
    out = []
    for i in ids:
        entry = {"index": i}
        if nv is not None:
            try:
                h = nv.nvmlDeviceGetHandleByIndex(i)
                name = nv.nvmlDeviceGetName(h)
                util = nv.nvmlDeviceGetUtilizationRates(h)
                mem = nv.nvmlDeviceGetMemoryInfo(h)
                entry.update(
                    name=name.decode() if isinstance(name, bytes) else name,
                    util=util.gpu, mem_used=mem.used, mem_total=mem.total,
                    temp=nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU),
                )
            except Exception:
                pass
        out.append(entry)
    return out


def memory_totals(ids) -> dict:
    """GPU index -> total memory in MiB, from NVML; GPUs it cannot tell are left out."""
    out = {}
    for g in telemetry(ids):
        if g.get("mem_total"):
            out[g["index"]] = g["mem_total"] // 2**20
    return out


_UNKNOWN_FREE_MB = 1 << 40  # a GPU of unknown size, unreserved: any one packed task fits


class GpuPool:
    """A worker's GPUs and who holds them: whole GPUs, or MiB reservations of packed tasks.

    A task with ``Limits(gpus=N)`` takes N GPUs nobody else uses. One with
    ``gpu_memory_gb`` reserves that much on each of its N GPUs and shares them with other
    packed tasks while the reservations fit the GPU's memory (``capacity_mb``; a GPU of unknown
    size takes one packed task at a time). Thread-safe.
    """

    def __init__(self, ids, capacity_mb: dict | None = None):
        self.ids = sorted(ids)
        self.capacity = dict(capacity_mb or {})
        self.used = {i: 0 for i in self.ids}  # MiB reserved by packed tasks
        self.whole: set = set()  # held by whole-GPU tasks
        self.lock = threading.Lock()

    def _free_mb(self, i: int) -> int:
        if i in self.whole:
            return 0
        cap = self.capacity.get(i)
        if cap is None:
            return _UNKNOWN_FREE_MB if self.used[i] == 0 else 0
        return cap - self.used[i]

    def offer(self) -> tuple[int, list]:
        """(GPUs free for a whole-GPU task, unreserved MiB per GPU packed tasks may share)."""
        with self.lock:
            free = sum(1 for i in self.ids if i not in self.whole and self.used[i] == 0)
            return free, [self._free_mb(i) for i in self.ids if i not in self.whole]

    def acquire(self, n: int, mb: int = 0, prefer=()) -> tuple | None:
        """Take ``n`` GPUs (whole, or ``mb`` MiB on each); None when they are not there.

        GPUs in ``prefer`` (the ones a task process already uses) come first; packed tasks
        then go where the least room is left, so whole GPUs stay free for whole-GPU tasks.
        """
        if n <= 0:
            return ()
        with self.lock:
            if mb <= 0:
                cands = [i for i in self.ids if i not in self.whole and self.used[i] == 0]
                cands.sort(key=lambda i: (i not in prefer, i))
            else:
                cands = [i for i in self.ids if self._free_mb(i) >= mb]
                cands.sort(key=lambda i: (i not in prefer, self._free_mb(i), i))
            if len(cands) < n:
                return None
            take = tuple(sorted(cands[:n]))
            for i in take:
                if mb <= 0:
                    self.whole.add(i)
                else:
                    self.used[i] += mb
            return take

    def release(self, ids, mb: int = 0) -> None:
        with self.lock:
            for i in ids:
                if mb <= 0:
                    self.whole.discard(i)
                else:
                    self.used[i] = max(0, self.used[i] - mb)
