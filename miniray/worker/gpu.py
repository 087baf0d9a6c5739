"""The GPUs a worker owns and what it tells about them: which devices (``--gpus``, else the
``CUDA_VISIBLE_DEVICES`` it was started with, else every GPU NVML lists), mapped to NVML by
index, UUID or PCI bus id; how a task names them in its own ``CUDA_VISIBLE_DEVICES``; their
telemetry (each NVML field read on its own); and the pool of who holds them. Without NVML
(no package, no driver) GPUs are known by what they were given as, with no telemetry.

Precedence: ``--gpus`` (GPU indices as nvidia-smi numbers them, UUIDs or PCI bus ids; it
must name GPUs inside ``CUDA_VISIBLE_DEVICES`` when that is set), then
``CUDA_VISIBLE_DEVICES`` (read as CUDA reads it: indices or ``GPU-``/``MIG-`` UUIDs, up to the
first entry that is neither; empty: no GPU), then NVML's list. A task's
``CUDA_VISIBLE_DEVICES`` names its GPUs as the worker was given them (a UUID stays a UUID, an
index an index), and miniray sets ``CUDA_DEVICE_ORDER=PCI_BUS_ID`` so that an index means the
GPU NVML and nvidia-smi number so.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass

from miniray.errors import ConfigurationError

__all__ = ["Gpu", "Owned", "GpuPool", "own", "discover", "memory_totals", "telemetry",
           "visible_devices"]

_nvml_lock = threading.Lock()
_nvml_state: dict = {}


def _nvml():
    """The initialised pynvml module, or None (no package, no driver); tried once. This is
    the one place miniray reaches NVML (a test puts a device table here: ``_use_nvml``)."""
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


def _use_nvml(nv, why: str = "") -> None:
    """Use ``nv`` (an object with pynvml's functions, or None: no NVML) from now on."""
    with _nvml_lock:
        _nvml_state.clear()
        _nvml_state["mod"], _nvml_state["why"] = nv, why or "none given"


@dataclass(frozen=True)
class Gpu:
    """One GPU a worker owns.

    ``id``: its key in the worker's pool and its ``index`` in telemetry: NVML's index (PCI
    bus order) when NVML knows the GPU, else the index it was given (or the next free number
    past NVML's for a UUID NVML cannot tell, or a MIG instance). ``name``: how a task's ``CUDA_VISIBLE_DEVICES`` names it.
    """

    id: int
    name: str
    uuid: str | None = None
    bus_id: str | None = None


@dataclass(frozen=True)
class Owned:
    """What ``own`` found: the GPUs, where from (``--gpus``, ``CUDA_VISIBLE_DEVICES``,
    ``NVML``, ``none``), and a sentence saying which and why, for the worker's log."""

    gpus: tuple
    source: str
    note: str

    @property
    def ids(self) -> list:
        return [g.id for g in self.gpus]


def _text(v) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


def _table(nv) -> list | None:
    """(index, uuid, bus id) of every GPU NVML lists, in its (PCI bus) order; None when
    NVML cannot count them (a GPU it cannot open is listed with no UUID or bus id)."""
    if nv is None:
        return None
    try:
        count = nv.nvmlDeviceGetCount()
    except Exception:
        return None
    rows = []
    for i in range(count):
        uuid = bus = None
        try:
            h = nv.nvmlDeviceGetHandleByIndex(i)
        except Exception:  # fallen off the bus, or not ours to open
            rows.append((i, None, None))
            continue
        try:
            uuid = _text(nv.nvmlDeviceGetUUID(h))
        except Exception:
            pass
        try:
            bus = _text(nv.nvmlDeviceGetPciInfo(h).busId)
        except Exception:
            pass
        rows.append((i, uuid, bus))
    return rows


def _is_uuid(tok: str) -> bool:
    return tok[:4].upper() in ("GPU-", "MIG-")


def _bus_key(bus: str) -> str:
    """``00000000:3B:00.0`` and ``0000:3b:00.0`` and ``3b:00.0`` alike: bus:device.function."""
    return ":".join(bus.lower().split(":")[-2:])


def _visible_tokens(cvd: str) -> tuple[list, str]:
    """``CUDA_VISIBLE_DEVICES`` as CUDA reads it: entries up to the first that is neither an
    index nor a UUID (``-1``, ``NoDevFiles``); and a note on what was ignored."""
    out: list = []
    parts = [t.strip() for t in cvd.split(",")] if cvd.strip() else []
    for k, tok in enumerate(parts):
        if not (tok.isdigit() or _is_uuid(tok)):
            rest = ",".join(parts[k:])
            return out, f"; {rest!r} ignored, as CUDA ignores what follows an invalid entry"
        out.append(tok)
    return out, ""


def _resolve(tokens, nv, strict: bool, origin: str) -> tuple[list, list]:
    """GPUs for ``tokens`` (indices, UUIDs or their prefixes, PCI bus ids), and notes on
    the ones NVML does not know (kept, with no telemetry); ``strict``: a token that is none
    of those (a PCI bus id NVML does not list, a typo) is refused."""
    table = _table(nv)
    found: list = []
    unknown: list = []
    notes: list = []
    for tok in tokens:
        row = None
        if table is not None:
            if tok.isdigit():
                row = next((r for r in table if r[0] == int(tok)), None)
            elif _is_uuid(tok):
                rows = [r for r in table if r[1] and r[1].lower().startswith(tok.lower())]
                row = rows[0] if len(rows) == 1 else None
                if len(rows) > 1:
                    raise ConfigurationError(
                        f"{origin} {tok!r}: more than one GPU has a UUID starting so; give "
                        f"more of it ({', '.join(r[1] for r in rows)})")
                if row is None and tok.upper().startswith("MIG-") and _mig_known(nv, tok):
                    unknown.append(Gpu(-1, tok, tok))  # a MIG instance: its own UUID
                    continue
            elif ":" in tok:
                row = next((r for r in table if r[2] and _bus_key(r[2]) == _bus_key(tok)),
                           None)
        if row is not None:
            name = tok if (tok.isdigit() or _is_uuid(tok)) else (row[1] or str(row[0]))
            found.append(Gpu(row[0], name, row[1], row[2]))
            continue
        if strict and not (tok.isdigit() or _is_uuid(tok)):
            listed = ", ".join(f"{r[0]} ({r[1]}, {r[2]})" for r in table or ())
            raise ConfigurationError(
                f"{origin} {tok!r}: no such GPU; "
                + (f"NVML lists {listed or 'none'}" if table is not None else
                   "without NVML only indices (0,1) and UUIDs (GPU-...) can be given")
                + "; give indices as nvidia-smi numbers them, UUIDs or PCI bus ids")
        # an index or UUID NVML does not list is kept (a simulated GPU, a view NVML lacks),
        # with no telemetry and a note in the worker's log
        if tok.isdigit():
            found.append(Gpu(int(tok), tok))
        else:
            unknown.append(Gpu(-1, tok, tok if _is_uuid(tok) else None))
        if table is not None:
            notes.append(f"{tok} is not one NVML lists: no telemetry for it")
    # a UUID NVML cannot number (or a MIG instance) takes the next free number
    taken = {g.id for g in found}
    nxt = max(taken | {-1, len(table or ()) - 1}) + 1
    for g in unknown:
        found.append(Gpu(nxt, g.name, g.uuid, None))
        nxt += 1
    seen: set = set()
    unique = [g for g in found if not (g.id in seen or seen.add(g.id))]
    return unique, notes


def _mig_known(nv, tok: str) -> bool:
    try:
        nv.nvmlDeviceGetHandleByUUID(tok)
        return True
    except Exception:
        return False


def own(spec=None, env=None) -> Owned:
    """The GPUs a worker owns, and why (see the module's docstring for the precedence).

    ``spec``: ``--gpus``: None (not given), ``"none"``/``""`` (no GPUs), ``"0,1"``,
    ``"GPU-8f2c...,GPU-1a9e..."``, PCI bus ids, or a list of ints. ``env``: the environment
    (``os.environ``).
    """
    env = os.environ if env is None else env
    cvd = env.get("CUDA_VISIBLE_DEVICES")
    if spec is not None:
        if isinstance(spec, str):
            spec = spec.strip()
            if spec.lower() in ("", "none"):
                return Owned((), "--gpus", "GPUs: none (--gpus none)")
            tokens = [t.strip() for t in spec.split(",") if t.strip()]
        else:
            tokens = [str(int(x)) for x in spec]
        nv = _nvml()
        gpus, notes = _resolve(tokens, nv, strict=True, origin="--gpus")
        if cvd is not None:
            allowed, _ = _resolve(_visible_tokens(cvd)[0], nv, strict=False,
                                  origin="CUDA_VISIBLE_DEVICES")
            keys = {_key(g, nv) for g in allowed}
            outside = [g.name for g in gpus if _key(g, nv) not in keys]
            if outside:
                raise ConfigurationError(
                    f"--gpus {spec}: {', '.join(outside)} is not among the GPUs this worker "
                    f"was started with (CUDA_VISIBLE_DEVICES={cvd}); --gpus names GPUs as "
                    "nvidia-smi does, never relative to CUDA_VISIBLE_DEVICES. Give some of "
                    "those, or leave --gpus out to own all of them")
        return Owned(tuple(gpus), "--gpus", f"GPUs {_names(gpus)} (--gpus {spec}"
                                            f"{''.join('; ' + n for n in notes)})")
    nv = _nvml()
    if cvd is not None:
        tokens, ignored = _visible_tokens(cvd)
        gpus, notes = _resolve(tokens, nv, strict=False, origin="CUDA_VISIBLE_DEVICES")
        why = f"CUDA_VISIBLE_DEVICES={cvd!r}{ignored}"
        if nv is None:
            why += f"; NVML unavailable ({_nvml_state.get('why')}): no telemetry"
        return Owned(tuple(gpus), "CUDA_VISIBLE_DEVICES",
                     f"GPUs {_names(gpus) or 'none'} ({why}{''.join('; ' + n for n in notes)})")
    table = _table(nv)
    if table is None:
        why = _nvml_state.get("why") if nv is None else "it cannot count the GPUs"
        return Owned((), "none", f"no GPU: NVML unavailable ({why}); running CPU-only")
    gpus = [Gpu(i, str(i), uuid, bus) for i, uuid, bus in table]
    return Owned(tuple(gpus), "NVML", f"GPUs {_names(gpus) or 'none'} found with NVML "
                                      "(no --gpus, no CUDA_VISIBLE_DEVICES)")


def _key(g: Gpu, nv) -> str:
    """What makes two ``Gpu`` the same device: the UUID, else NVML's index, else the name."""
    return (g.uuid or "").lower() or (str(g.id) if nv is not None else g.name)


def _names(gpus) -> str:
    return ", ".join(g.name if g.name == str(g.id) else f"{g.id} ({g.name})" for g in gpus)


def discover(spec=None) -> tuple[list[int], str]:
    """GPU ids this worker owns and a note saying how they were found (see ``own``)."""
    o = own(spec)
    return o.ids, o.note


def visible_devices(ids, names: dict | None = None) -> str:
    """A task's ``CUDA_VISIBLE_DEVICES`` for the pool ids ``ids``: their names (``Gpu.name``)."""
    names = names or {}
    return ",".join(names.get(i, str(i)) for i in ids or ())


def _handle(nv, g):
    if isinstance(g, Gpu) and g.uuid:
        return nv.nvmlDeviceGetHandleByUUID(g.uuid)
    return nv.nvmlDeviceGetHandleByIndex(g.id if isinstance(g, Gpu) else g)


def telemetry(gpus) -> list[dict]:
    """Per GPU (a ``Gpu`` or an NVML index): index, uuid, name, utilisation %, memory
    used/total (bytes), temperature (C). Each field is read on its own: one NVML cannot
    give (a temperature a board does not report, a MIG instance's utilisation) is left
    out, the others stay. Without NVML only the index (and a given UUID) is reported.
    """
    nv = _nvml() if gpus else None
    out = []
    for g in gpus:
        entry = {"index": g.id if isinstance(g, Gpu) else g}
        if isinstance(g, Gpu) and g.uuid:
            entry["uuid"] = g.uuid
        out.append(entry)
        if nv is None:
            continue
        try:
            h = _handle(nv, g)
        except Exception:
            continue
        for read in _FIELDS:
            try:
                entry.update(read(nv, h))
            except Exception:  # NVMLError_NotSupported and friends: this field only
                pass
    return out


def _mem(nv, h):
    m = nv.nvmlDeviceGetMemoryInfo(h)
    return {"mem_used": m.used, "mem_total": m.total}


_FIELDS = (
    lambda nv, h: {"name": _text(nv.nvmlDeviceGetName(h))},
    lambda nv, h: {"util": nv.nvmlDeviceGetUtilizationRates(h).gpu},
    _mem,
    lambda nv, h: {"temp": nv.nvmlDeviceGetTemperature(h, nv.NVML_TEMPERATURE_GPU)},
)


def memory_totals(gpus) -> dict:
    """GPU id -> total memory in MiB, from NVML; GPUs it cannot tell are left out."""
    out = {}
    for g in telemetry(gpus):
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
