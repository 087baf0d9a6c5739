"""GPU discovery and telemetry through NVML (``nvidia-ml-py``); absent NVML means no GPU fields."""

from __future__ import annotations

import threading

__all__ = ["discover", "telemetry"]

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
