"""Per-job resource limits: what a task may use and which workers may run it."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from miniray.errors import ConfigurationError

__all__ = ["Limits", "as_limits"]


@dataclass(frozen=True)
class Limits:
    """Limits applied to every task of an executor's job.

    - ``timeout_seconds``: wall time per task; past it the task's process tree is killed and
      its future fails with :class:`~miniray.errors.TaskTimeoutError` (a ``TimeoutError``).
    - ``memory_gb``: a hard cgroup memory limit on the task's process tree (RLIMIT_AS where
      no cgroup can be written); going over fails the future with ``MemoryLimitError``.
    - ``cpus``: cores the task is pinned to (``sched_setaffinity``), also exported as
      ``OMP_NUM_THREADS`` and friends.
    - ``gpus``: GPUs the task needs; they are set in ``CUDA_VISIBLE_DEVICES``. With 0 the task
      sees no GPU at all. Each GPU is the task's alone, unless ``gpu_memory_gb`` is given.
    - ``gpu_memory_gb``: pack small tasks: the task needs this much memory on each of its GPUs
      and shares a GPU with other packed tasks while their sum fits the GPU's memory (NVML's
      total, or the worker's ``--gpu-memory``). Implies ``gpus=1`` when ``gpus`` is 0. A
      reservation, not an enforced limit: the task must stay within it.
    - ``nodes``: host or worker names the task may run on (any, when empty).
    - ``triton``: run only on workers with a healthy Triton Inference Server
      (``miniray worker --triton``); inside the task, ``miniray.triton.client()`` reaches it.
    - ``keep_children``: processes a task starts and leaves running (a daemon, a server for
      the next tasks) are kept. By default they are killed (SIGKILL) when the chunk that
      started them returns, double-forked daemons included; kept ones live until they exit
      or the task process ends.

    >>> Limits(timeout_seconds=60, memory_gb=2, cpus=1)
    Limits(timeout_seconds=60, memory_gb=2, cpus=1, gpus=0, gpu_memory_gb=None, nodes=(), triton=False, keep_children=False)
    >>> Limits(gpu_memory_gb=4).gpus
    1

    comma's miniray field names are read too where they mean the same (``memory`` GiB,
    ``cpu_threads``, ``node_whitelist``; see ``miniray.client.comma``):

    >>> Limits(memory=4, cpu_threads=2) == Limits(memory_gb=4, cpus=2)
    True
    """

    timeout_seconds: float | None = None
    memory_gb: float | None = None
    cpus: int | None = None
    gpus: int = 0
    gpu_memory_gb: float | None = None
    nodes: tuple = field(default=())
    triton: bool = False
    keep_children: bool = False

    def __post_init__(self):
        def positive(name, value, kind=(int, float)):
            if value is None:
                return
            if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
                raise ConfigurationError(
                    f"Limits({name}={value!r}) must be a positive number or None; "
                    f"pass e.g. Limits({name}=1)"
                )

        positive("timeout_seconds", self.timeout_seconds)
        positive("memory_gb", self.memory_gb)
        positive("cpus", self.cpus, int)
        if isinstance(self.gpus, bool) or not isinstance(self.gpus, int) or self.gpus < 0:
            raise ConfigurationError(
                f"Limits(gpus={self.gpus!r}) must be a whole number >= 0; pass e.g. Limits(gpus=1)"
            )
        positive("gpu_memory_gb", self.gpu_memory_gb)
        if self.gpu_memory_gb is not None and self.gpus == 0:
            object.__setattr__(self, "gpus", 1)
        for name in ("triton", "keep_children"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigurationError(
                    f"Limits({name}={getattr(self, name)!r}) must be True or False")
        nodes = self.nodes
        if isinstance(nodes, str):
            nodes = (nodes,)
        nodes = tuple(nodes or ())
        for n in nodes:
            if not isinstance(n, str) or not n or "," in n:
                raise ConfigurationError(
                    f"Limits(nodes=...) takes host or worker names; {n!r} is not one"
                )
        object.__setattr__(self, "nodes", nodes)

    @property
    def memory_bytes(self) -> int | None:
        return None if self.memory_gb is None else int(self.memory_gb * 1024**3)

    @property
    def gpu_memory_mb(self) -> int:
        """The packed GPU memory reservation in MiB (0: whole GPUs)."""
        return 0 if self.gpu_memory_gb is None else max(1, int(self.gpu_memory_gb * 1024))

    def requirement_fields(self) -> dict:
        """The job-hash fields the claim script matches against a worker's capabilities."""
        return {
            "req_gpus": self.gpus,
            "req_cpus": self.cpus or 0,
            "req_nodes": ("," + ",".join(self.nodes) + ",") if self.nodes else "",
            "req_gpu_mem": self.gpu_memory_mb,
            "req_triton": int(self.triton),
        }


_FIELDS = tuple(f.name for f in fields(Limits))
_dataclass_init = Limits.__init__


@functools.wraps(_dataclass_init)
def _init(self, *args, **kwargs):
    if kwargs.keys() - set(_FIELDS):  # comma's names, or a mistake said plainly
        from .comma import translate_limits

        kwargs = translate_limits(kwargs, _FIELDS)
    _dataclass_init(self, *args, **kwargs)


Limits.__init__ = _init


def as_limits(value) -> Limits:
    """``Executor(limits=...)``: a ``Limits``, None (no limits), or a dict of field names
    (miniray's or comma's; a comma ``Limits``' ``asdict()`` passes as it is)."""
    if value is None:
        return Limits()
    if isinstance(value, Limits):
        return value
    if isinstance(value, Mapping):
        if not all(isinstance(k, str) for k in value):
            raise ConfigurationError(f"limits={value!r}: its keys must be field names")
        return Limits(**value)
    raise ConfigurationError(
        f"limits must be a miniray.Limits or a dict of its fields, not {value!r}; "
        "e.g. limits=miniray.Limits(memory_gb=2) or limits={'memory': 2, 'cpu_threads': 1}")
