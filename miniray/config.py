"""Every setting miniray reads from the environment, in one place.

Precedence everywhere: an explicit argument, then the ``MINIRAY_*`` variable, then the default
below. Nothing else in the package reads ``os.environ`` for configuration.

=============================  ==========  ===============================================
variable                       default     meaning
=============================  ==========  ===============================================
MINIRAY_REDIS_URL              (unset)     server to use; unset means the embedded local cluster
MINIRAY_NAMESPACE              miniray     prefix of every Redis key (several clusters per server)
MINIRAY_LOCAL_WORKERS          cores       worker processes the embedded local cluster starts
MINIRAY_SERVER_BIN             (search)    redis-server/valkey-server binary for the local cluster
MINIRAY_HEARTBEAT_SECONDS      1.0         how often a worker heartbeats
MINIRAY_WORKER_DEAD_SECONDS    10.0        a worker silent this long is dead; its tasks requeue
MINIRAY_MAX_RETRIES            1           requeues of a task whose worker died, then WorkerLostError
MINIRAY_CLIENT_GRACE_SECONDS   600         how long the cluster keeps an executor's job while it
                                           hears nothing from it (a paused laptop, a debugger, a
                                           dead process); then the job is given up, with its
                                           unread results, and the executor, if it comes back,
                                           fails what was pending with JobAbandonedError
MINIRAY_KEEP_GRACE_SECONDS     86400       how long a kept job (``Executor(keep=True)``, ``--bg``)
                                           runs on, and keeps its results on the cluster,
                                           after its client died (see miniray.attach)
MINIRAY_SERVER_GONE_SECONDS    300         a worker that cannot reach its server this long
                                           exits with status 75, for its supervisor to restart
MINIRAY_FUNCTION_TTL_SECONDS   86400       how long a pickled function stays in Redis unused
MINIRAY_RESULT_TTL_SECONDS     86400       how long a finished job's counters, logs and events
                                           stay in Redis (unread results: the client's grace)
MINIRAY_DIRECT_RESULTS         1           0: results from task processes on the client's
                                           machine go through Redis too (see miniray.values.inbox)
MINIRAY_SHM                    1           large values between a client and task processes on
                                           its machine go through shared memory (/dev/shm, see
                                           miniray.values.shm): results always, arguments while the
                                           server and every worker are on this machine; 2:
                                           arguments always (only when every worker runs on
                                           this machine); 0: neither (all through the server)
MINIRAY_SHM_MIN_BYTES          1048576     an out-of-band buffer this big or bigger goes
                                           through shared memory (when MINIRAY_SHM is on)
MINIRAY_LOG_STREAM_MAXLEN      10000       log lines kept per job (approximate, oldest dropped)
MINIRAY_LOG_LINE_MAX_BYTES     65536       a longer log line is cut, with a marker saying how
                                           many bytes were cut (see miniray.worker.task.output)
MINIRAY_EVENT_STREAM_MAXLEN    10000       task events kept per job (approximate)
MINIRAY_RERUN_KEEP_BYTES       1048576     a submit's or map_futures chunk's pickled arguments
                                           up to this size stay in the client until the task
                                           ends, and with its future if it fails, so that
                                           ``future.rerun_locally()`` / ``%miniray debug`` can
                                           re-run it here; 0 keeps none (see miniray.client.rerun)
MINIRAY_IDLE_WAIT_SECONDS      30.0        how long an idle slot's blocking wait for work lasts
                                           before it looks for work once more on its own (work
                                           wakes it at once; so do its worker's messages). A
                                           wake-up costs the server a command and a claim
                                           script: 1,000 idle slots at 30 s cost ~0.3% of a core
MINIRAY_KILL_GRACE_SECONDS     2.0         SIGINT -> SIGKILL grace for cancelled running tasks
MINIRAY_CACHE_TTL_SECONDS      604800      how long a cached map item's result (``cache=True``,
                                           ``--cache``) is kept after it was stored (7 days)
MINIRAY_CACHE_MAX_BYTES        1073741824  total size of the cached results on a cluster (1 GiB);
                                           the oldest are evicted first; 0 stores nothing
MINIRAY_TRITON_BIN             (search)    tritonserver binary for ``worker --triton`` (else PATH,
                                           then the one in the nvidia-pytriton wheel)
MINIRAY_TRITON_STALE_SECONDS   (unset)     default ``stale_after_seconds`` of
                                           ``miniray.triton.load_model`` (unset: never unload)
MINIRAY_CLUSTER_DIR            (derived)   where the persistent local cluster's file lives
                                           (``miniray.persistent``): $XDG_RUNTIME_DIR/miniray
                                           when XDG_RUNTIME_DIR is set, else ~/.miniray
MINIRAY_IDLE_STOP_SECONDS      3600        the persistent local cluster stops itself after this
                                           long with no jobs, no running tasks and no live
                                           executors (0: never)
=============================  ==========  ===============================================
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

__all__ = ["Settings", "settings"]


def _env(name: str, default, cast=str):
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        return cast(raw)
    except ValueError:
        from .errors import ConfigurationError

        raise ConfigurationError(
            f"{name}={raw!r} is not a valid {cast.__name__}; unset it or give a number"
        ) from None


@dataclass(frozen=True)
class Settings:
    """A snapshot of the environment's MINIRAY_* settings (see the module docstring)."""

    redis_url: str | None = None
    namespace: str = "miniray"
    local_workers: int | None = None
    server_bin: str | None = None
    heartbeat_seconds: float = 1.0
    worker_dead_seconds: float = 10.0
    max_retries: int = 1
    client_grace_seconds: float = 600.0
    keep_grace_seconds: float = 86400.0
    server_gone_seconds: float = 300.0
    function_ttl_seconds: int = 86400
    result_ttl_seconds: int = 86400
    direct_results: bool = True
    shm: int = 1
    shm_min_bytes: int = 1048576
    log_stream_maxlen: int = 10000
    log_line_max_bytes: int = 65536
    event_stream_maxlen: int = 10000
    kill_grace_seconds: float = 2.0
    idle_wait_seconds: float = 30.0
    rerun_keep_bytes: int = 1048576
    cache_ttl_seconds: int = 604800
    cache_max_bytes: int = 1 << 30
    triton_bin: str | None = None
    triton_stale_seconds: float | None = None
    cluster_dir: str | None = None
    idle_stop_seconds: float = 3600.0
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_env(cls) -> "Settings":
        return cls(
            redis_url=_env("MINIRAY_REDIS_URL", None),
            namespace=_env("MINIRAY_NAMESPACE", "miniray"),
            local_workers=_env("MINIRAY_LOCAL_WORKERS", None, int),
            server_bin=_env("MINIRAY_SERVER_BIN", None),
            heartbeat_seconds=_env("MINIRAY_HEARTBEAT_SECONDS", 1.0, float),
            worker_dead_seconds=_env("MINIRAY_WORKER_DEAD_SECONDS", 10.0, float),
            max_retries=_env("MINIRAY_MAX_RETRIES", 1, int),
            client_grace_seconds=_env("MINIRAY_CLIENT_GRACE_SECONDS", 600.0, float),
            keep_grace_seconds=_env("MINIRAY_KEEP_GRACE_SECONDS", 86400.0, float),
            server_gone_seconds=_env("MINIRAY_SERVER_GONE_SECONDS", 300.0, float),
            function_ttl_seconds=_env("MINIRAY_FUNCTION_TTL_SECONDS", 86400, int),
            result_ttl_seconds=_env("MINIRAY_RESULT_TTL_SECONDS", 86400, int),
            direct_results=_env("MINIRAY_DIRECT_RESULTS", 1, int) != 0,
            shm=_env("MINIRAY_SHM", 1, int),
            shm_min_bytes=_env("MINIRAY_SHM_MIN_BYTES", 1048576, int),
            log_stream_maxlen=_env("MINIRAY_LOG_STREAM_MAXLEN", 10000, int),
            log_line_max_bytes=_env("MINIRAY_LOG_LINE_MAX_BYTES", 65536, int),
            event_stream_maxlen=_env("MINIRAY_EVENT_STREAM_MAXLEN", 10000, int),
            kill_grace_seconds=_env("MINIRAY_KILL_GRACE_SECONDS", 2.0, float),
            idle_wait_seconds=_env("MINIRAY_IDLE_WAIT_SECONDS", 30.0, float),
            rerun_keep_bytes=_env("MINIRAY_RERUN_KEEP_BYTES", 1048576, int),
            cache_ttl_seconds=_env("MINIRAY_CACHE_TTL_SECONDS", 604800, int),
            cache_max_bytes=_env("MINIRAY_CACHE_MAX_BYTES", 1 << 30, int),
            triton_bin=_env("MINIRAY_TRITON_BIN", None),
            triton_stale_seconds=_env("MINIRAY_TRITON_STALE_SECONDS", None, float),
            cluster_dir=_env("MINIRAY_CLUSTER_DIR", None),
            idle_stop_seconds=_env("MINIRAY_IDLE_STOP_SECONDS", 3600.0, float),
        )


def settings() -> Settings:
    """Read the environment now (cheap; call sites read it when they start, not per task)."""
    return Settings.from_env()
