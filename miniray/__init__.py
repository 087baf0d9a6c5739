"""miniray: run Python functions on many machines from a notebook or a script.

>>> import miniray
>>> ex = miniray.Executor()                       # doctest: +SKIP
>>> sum(ex.map(lambda x: x * x, range(10_000), chunksize=100))   # doctest: +SKIP
333283335000

Names are imported lazily, so a worker's task process and ``import miniray`` stay light.
Whoever can write to the Redis server can run code on its workers: keep it private.
"""

import importlib
import sys

__version__ = "0.1.0"

_EXPORTS = {
    "Executor": "client.executor",
    "MinirayFuture": "client.futures",
    "Limits": "client.limits",
    "LocalCluster": "cluster.local",
    "init": "cluster.local",
    "shutdown": "cluster.local",
    "Worker": "worker.supervisor",
    "LogLine": "client.observe",
    "progress": "client.progressbar",
    "Event": "client.observe",
    "MinirayError": "errors",
    "ConfigurationError": "errors",
    "SerializationError": "errors",
    "PayloadTooLargeError": "errors",
    "ServerError": "errors",
    "ServerLostError": "errors",
    "TaskError": "errors",
    "TaskTimeoutError": "errors",
    "MemoryLimitError": "errors",
    "TaskCrashedError": "errors",
    "WorkerLostError": "errors",
    "JobAbandonedError": "errors",
    "JobCancelledError": "errors",
    "JobNotFoundError": "errors",
    "JobNotKeptError": "errors",
    "attach": "client.jobhandle",
    "JobHandle": "client.jobhandle",
    "InitializerError": "errors",
    "RerunError": "errors",
    "RerunSucceededWarning": "errors",
    "TritonError": "errors",
    "RemoteTraceback": "errors",
    "SSHError": "errors",
    "SSHAuthError": "errors",
    "SSHHostKeyError": "errors",
    "SSHUnreachableError": "errors",
    "SSHPreflightError": "errors",
    "SSHClusterError": "errors",
    "SSHCluster": "cluster.ssh.cluster",
    "NodeConfig": "cluster.ssh.cluster",
    "parse_hosts": "cluster.ssh.hosts",
    "ChannelError": "errors",
    "ActorDiedError": "errors",
    "actor": "channels.actors",
    "ActorPool": "channels.actors",
}

# modules the README names as ``miniray.NAME``: reached as attributes, without an import
_MODULES = {"triton": "triton", "cache": "client.cache", "persistent": "cluster.persistent"}

# modules users import by their old paths (comma's ``miniray.executor``; ours before the parts
# had folders): ``import miniray.executor`` is ``miniray.client.executor``, the same module
_MOVED = {"miniray.executor": "client.executor", "miniray.local": "cluster.local",
          "miniray.persistent": "cluster.persistent"}


class _MovedFinder:
    """Imports a module of ``_MOVED`` under its old name (one module object, two names)."""

    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in _MOVED:
            return None
        from importlib.util import spec_from_loader

        return spec_from_loader(name, _MovedFinder)

    @staticmethod
    def create_module(spec):
        return importlib.import_module(f".{_MOVED[spec.name]}", __name__)

    @staticmethod
    def exec_module(module):
        pass


sys.meta_path.insert(0, _MovedFinder)

__all__ = sorted(_EXPORTS) + ["__version__", "load_ipython_extension"]


def __getattr__(name: str):
    if name in _MODULES:  # ``miniray.triton.client()``, ``miniray.cache.clear()`` (no import first)
        return importlib.import_module(f".{_MODULES[name]}", __name__)
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'miniray' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return __all__


def load_ipython_extension(ipython):  # the notebook face lives in jupyter_ext
    from jupyter_ext import load_ipython_extension as load

    load(ipython)
