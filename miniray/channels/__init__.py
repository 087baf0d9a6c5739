"""Direct channels: forked and TCP workers with send/recv, SSH clusters, shared memory, NCCL env.

The research-MiniRay layer of miniray: long-lived stateful processes you talk to directly,
without the Redis broker. ``miniray.channels.actors`` builds Ray-style actors on it.
"""

from miniray.errors import (
    ActorDiedError,
    AuthenticationError,
    ChannelClosedError,
    ChannelError,
    ClusterError,
    FrameTooLargeError,
    ProtocolError,
    RemoteTraceback,
    WorkerDiedError,
)

from .cluster import Cluster, NodeConfig
from .framing import DEFAULT_MAX_SIZE, PROTOCOL_VERSION, Channel
from .nccl import NCCLConfig, nccl_configs, restore_nccl_env, setup_nccl_env
from .remote import RemoteWorker
from .shared import SharedBuffer
from .worker import Worker, wait_any


def __getattr__(name):
    # Imported lazily so that `python -m miniray.channels.server` does not find the module
    # already imported by its own package (runpy warns about that).
    if name == "WorkerServer":
        from .server import WorkerServer

        return WorkerServer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ActorDiedError", "AuthenticationError", "Channel", "ChannelClosedError", "ChannelError",
    "Cluster", "ClusterError", "DEFAULT_MAX_SIZE", "FrameTooLargeError", "NCCLConfig",
    "NodeConfig", "PROTOCOL_VERSION", "ProtocolError", "RemoteTraceback", "RemoteWorker",
    "SharedBuffer", "Worker", "WorkerDiedError", "WorkerServer", "nccl_configs",
    "restore_nccl_env", "setup_nccl_env", "wait_any",
]
