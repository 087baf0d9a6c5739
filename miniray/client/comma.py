"""comma.ai's miniray names, read by this miniray: its ``Limits`` field names (translated to
miniray's, or refused with what to write instead) and its ``MinirayError.exception_type``
strings (mapped to the exception classes miniray raises). README "Coming from comma's miniray"
is the user's view of the same tables.

comma's ``Limits`` (``miniray/lib/helpers.py``): ``cpu_threads: int = 1``, ``memory: float = 1.0``
(GiB: its worker multiplies by 1024**3), ``small_gpu_memory`` / ``big_gpu_memory: float = 0.0``
(GiB on a small or a big GPU), ``timeout_seconds: int = 60``, ``triton: bool = False``,
``node_whitelist: list[str] | None = None``.
"""

from __future__ import annotations

import difflib

from miniray.errors import ConfigurationError

__all__ = ["LIMIT_NAMES", "NO_EQUIVALENT", "EXCEPTION_TYPES", "EXECUTOR_ARGS",
           "FMAP_BUFFERSIZE", "translate_limits", "refuse_executor_args"]

# Executor.fmap's default bound, in chunks unfinished at once. comma's fmap writes 1000 tasks
# at a time and never stops; here the input is read as results come back, so a generator
# runs in flat memory. A cluster with more slots than this times chunksize needs a larger one.
FMAP_BUFFERSIZE = 1024

# comma's name -> miniray's (same meaning and unit; comma's memory is GiB, as memory_gb is)
LIMIT_NAMES = {
    "memory": "memory_gb",
    "cpu_threads": "cpus",
    "timeout_seconds": "timeout_seconds",
    "node_whitelist": "nodes",
    "triton": "triton",
}

# comma's names with no one-to-one miniray field: why, and what to write instead. A value of
# 0 (comma's default: no GPU memory asked) means nothing and is accepted, so that a comma
# Limits' asdict() passes as it is.
NO_EQUIVALENT = {
    "small_gpu_memory": (
        "miniray does not tell small GPUs (comma's T600 display cards) from big ones; reserve "
        "memory on any GPU with Limits(gpu_memory_gb=N), or take whole GPUs with "
        "Limits(gpus=N)"),
    "big_gpu_memory": (
        "its nearest miniray field is Limits(gpu_memory_gb=N): N GiB reserved on one GPU, "
        "shared with other packed tasks while they fit (comma also locks the GPU to one job; "
        "miniray does not); Limits(gpus=1) gives the task a whole GPU"),
}

# comma's MinirayError.exception_type -> (the miniray class raised instead, when); the
# README's table is this one. Every class is in miniray.errors (a test checks).
EXCEPTION_TYPES = {
    "ValueError, KeyError, ... (the task's own)": (
        None, "the task's exception itself: same type and args, the worker's traceback "
              "chained as __cause__ (a RemoteTraceback)"),
    "TimeoutError": ("TaskTimeoutError", "over Limits(timeout_seconds=...); a TimeoutError"),
    "MemoryError": ("MemoryLimitError", "over Limits(memory_gb=...); a MemoryError (where "
                    "only RLIMIT_AS is at hand the task's own MemoryError comes back as is)"),
    "ChildProcessError<N>": ("TaskCrashedError", "the task process died (signal, os._exit); "
                             "MemoryLimitError when it was killed for memory"),
    "NoResultError": ("TaskCrashedError", "the task process exited without a result"),
    "WorkerShutdown": ("WorkerLostError", "its worker stopped or died and the task's "
                       "MINIRAY_MAX_RETRIES requeues were used up"),
    "RuntimeError (task lost)": ("WorkerLostError", "as above"),
    "JobMetadataMissingError": ("JobAbandonedError", "the cluster gave the job up (it heard "
                                "nothing from the executor for MINIRAY_CLIENT_GRACE_SECONDS)"),
    "MinirayError (result payload missing)": ("JobAbandonedError", "as above: unread results "
                                              "are kept for the same grace"),
    "CacheMissError": ("MinirayError", "the pickled function expired from the server "
                       "(MINIRAY_FUNCTION_TTL_SECONDS) or the server restarted; submit again"),
    "VenvSyncError": (None, "none: miniray builds no environment per job; SSHCluster's "
                      "pre-flight raises SSHPreflightError when a host's packages differ"),
}


# comma's Executor keywords miniray has no use for, and what to do instead
EXECUTOR_ARGS = {
    "config": "pass its fields as keywords: Executor(job_name=..., priority=..., "
              "limits=..., env=...)",
    "codedir": "drop it: functions travel pickled by value (modules next to the notebook "
               "too), so workers need no shared code directory",
    "use_local_codedir": "drop it: functions travel pickled by value (modules next to the "
                         "notebook too), so there is no code directory to sync",
    "force_local": "Executor() with no address (and no MINIRAY_REDIS_URL) is local; to use "
                   "the local cluster whatever is set, Executor(redis_url=miniray.init().url)",
    "redis_host": "give a URL: Executor(redis_url='redis://:PASSWORD@HOST:6379'), or set "
                  "MINIRAY_REDIS_URL",
    "queue_name": "drop it: each executor is a job of its own; order jobs with priority=",
}


def refuse_executor_args(given: dict) -> None:
    """``Executor(**given)`` for keywords it does not take: a TypeError saying what to do
    (comma's keywords) or naming the keyword (anything else, as Python would)."""
    name = next(iter(given))
    if name in EXECUTOR_ARGS:
        raise TypeError(f"Executor({name}=...) is comma's miniray; here: {EXECUTOR_ARGS[name]}")
    raise TypeError(f"Executor() got an unexpected keyword argument {name!r}")


def translate_limits(given: dict, fields) -> dict:
    """``given`` with comma's names turned into miniray's; ``fields``: Limits' field names.

    Raises ``ConfigurationError`` naming the field to use (or saying there is none) for a
    name that is neither miniray's nor one of comma's that map cleanly.
    """
    out: dict = {}
    for name, value in given.items():
        if name in fields:
            target = name
        elif name in LIMIT_NAMES:
            target = LIMIT_NAMES[name]
            if name == "node_whitelist" and value is None:
                value = ()  # comma's "anywhere"
        elif name in NO_EQUIVALENT:
            if value in (0, 0.0, None):
                continue
            raise ConfigurationError(
                f"Limits({name}={value!r}): comma's {name} has no miniray equivalent: "
                f"{NO_EQUIVALENT[name]}")
        else:
            known = sorted(set(fields) | set(LIMIT_NAMES))
            close = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
            hint = f"did you mean {close[0]}? " if close else ""
            raise ConfigurationError(
                f"Limits({name}=...): no such limit; {hint}miniray's are "
                f"{', '.join(fields)} (comma's {', '.join(LIMIT_NAMES)} are read too)")
        if target in out:
            alias = next(k for k, v in LIMIT_NAMES.items() if v == target)
            raise ConfigurationError(
                f"Limits: {target} is given twice, as {target} and as {alias} (comma's name "
                "for it); give it once")
        out[target] = value
    return out
