"""A stand-in for ``pynvml`` over a small device table, for testing how ``miniray.worker.gpu`` maps
``CUDA_VISIBLE_DEVICES`` and ``--gpus`` to NVML's GPUs on a machine without one. The thing
under test is that mapping, not NVML: this answers only the calls ``miniray.worker.gpu`` makes.

In a test process: ``DeviceTable([...])`` given to ``miniray.worker.gpu._use_nvml``. In a worker
process: this directory first on ``PYTHONPATH`` and the table as JSON in ``FAKE_NVML_DEVICES``
(a list of {"uuid", "bus_id", "name", "util", "mem_used", "mem_total", "temp"}; a field
given as "error" raises NVMLError, as a board that does not report it would).
"""

import json
import os
from types import SimpleNamespace

NVML_TEMPERATURE_GPU = 0


class NVMLError(Exception):
    pass


class DeviceTable:
    NVML_TEMPERATURE_GPU = NVML_TEMPERATURE_GPU
    NVMLError = NVMLError

    def __init__(self, devices, mig=()):
        self.devices = [dict(d) for d in devices]
        self.mig = {m["uuid"]: dict(m) for m in mig}  # MIG instances: by UUID only
        self.calls = []

    def _field(self, h, name):
        self.calls.append((name, h.get("uuid")))
        v = h.get(name)
        if v == "error" or v is None:
            raise NVMLError(f"{name}: Not Supported")
        return v

    def nvmlInit(self):
        pass

    def nvmlDeviceGetCount(self):
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, i):
        if not 0 <= i < len(self.devices):
            raise NVMLError("Invalid Argument")
        return self.devices[i]

    def nvmlDeviceGetHandleByUUID(self, uuid):
        uuid = uuid.decode() if isinstance(uuid, bytes) else uuid
        for d in self.devices:
            if d["uuid"] == uuid:
                return d
        if uuid in self.mig:
            return self.mig[uuid]
        raise NVMLError("Not Found")

    def nvmlDeviceGetUUID(self, h):
        return h["uuid"]

    def nvmlDeviceGetPciInfo(self, h):
        return SimpleNamespace(busId=h["bus_id"].encode())

    def nvmlDeviceGetName(self, h):
        return self._field(h, "name")

    def nvmlDeviceGetUtilizationRates(self, h):
        return SimpleNamespace(gpu=self._field(h, "util"), memory=0)

    def nvmlDeviceGetMemoryInfo(self, h):
        used, total = self._field(h, "mem_used"), self._field(h, "mem_total")
        return SimpleNamespace(used=used, total=total, free=total - used)

    def nvmlDeviceGetTemperature(self, h, sensor):
        return self._field(h, "temp")


_table = DeviceTable(json.loads(os.environ.get("FAKE_NVML_DEVICES", "[]")))
for _name in dir(DeviceTable):
    if _name.startswith("nvml"):
        globals()[_name] = getattr(_table, _name)
