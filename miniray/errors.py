"""The exception tree of miniray, in one module.

A task's own exception comes back as itself (same type and args) with the worker's traceback
chained as ``__cause__`` (a :class:`RemoteTraceback`); the classes below are for what miniray
itself has to report::

    MinirayError
     ├── ConfigurationError      (ValueError)       a bad argument or MINIRAY_* setting
     ├── SerializationError      (TypeError)        a function, argument, result or exception
     │                                              that cannot be pickled
     ├── PayloadTooLargeError    (ValueError)       arguments or results too big for the
     │                                              server's memory (its maxmemory)
     ├── ServerError             (ConnectionError)  the Redis server cannot be started/reached
     │    └── ServerLostError                       the server went away while work was pending
     ├── TaskError                                  a task did not finish, for a reason of
     │    │                                         miniray's (not the task's own exception)
     │    ├── TaskTimeoutError   (TimeoutError)     over Limits.timeout_seconds; tree was killed
     │    ├── MemoryLimitError   (MemoryError)      over Limits.memory_gb; tree was killed
     │    ├── TaskCrashedError                      the task's process died (signal, os._exit)
     │    ├── WorkerLostError                       its worker died, retries were used up
     │    ├── JobAbandonedError                     the cluster gave the job up: it heard
     │    │                                         nothing from the executor for its grace
     │    └── InitializerError   (BrokenExecutor)   the executor's initializer raised
     ├── JobNotFoundError        (LookupError)      no such job on the cluster, or it ended
     │                                              and was forgotten (miniray.attach)
     ├── JobNotKeptError                            the job was not kept: its results went to
     │                                              its owner only (miniray.attach)
     ├── JobCancelledError       (CancelledError)   the job was cancelled while the task ran
     ├── RerunError                                 future.rerun_locally() cannot re-run the
     │                                              task (it did not fail; what it needs is gone)
     ├── TritonError                                the node's Triton server is missing, not
     │                                              ready, or refused a model load/unload
     ├── SSHError                                   an SSH host could not be used; .host
     │    ├── SSHAuthError                          every credential was refused
     │    ├── SSHHostKeyError                       host key unknown or changed
     │    ├── SSHUnreachableError                   no SSH server answered
     │    ├── SSHPreflightError                     host's Python/packages differ; all hosts
     │    └── SSHClusterError                       SSHCluster hosts failed to start; .errors
     └── ChannelError                               the direct-channel layer (miniray.channels)
          ├── FrameTooLargeError                    a frame over max_size (sent or received)
          ├── ChannelClosedError  (EOFError)        the peer went away
          │    └── WorkerDiedError                  the worker process exited; .exitcode
          ├── AuthenticationError                   the shared-secret handshake failed
          ├── ProtocolError                         the peer speaks another protocol/version
          ├── ActorDiedError                        an actor's process is gone
          └── ClusterError                          a Cluster node could not start its server

``RerunSucceededWarning`` (a ``UserWarning``): a failed task re-run here did not fail.

Any failed task: ``future.exception()`` is not None, or ``except Exception`` around
``future.result()`` (a task's own ``SystemExit``/``KeyboardInterrupt`` comes back as itself, as
with ``ProcessPoolExecutor``); ``except TaskError`` keeps only miniray's own reasons.

Builtin ``concurrent.futures.CancelledError`` and ``TimeoutError`` are what ``Future``
raises for a cancelled future or an elapsed ``result(timeout=...)``, as with any executor.
"""

from __future__ import annotations

from concurrent.futures import BrokenExecutor, CancelledError

__all__ = [
    "MinirayError",
    "ConfigurationError",
    "SerializationError",
    "PayloadTooLargeError",
    "ServerError",
    "ServerLostError",
    "TaskError",
    "TaskTimeoutError",
    "MemoryLimitError",
    "TaskCrashedError",
    "WorkerLostError",
    "JobAbandonedError",
    "JobCancelledError",
    "JobNotFoundError",
    "JobNotKeptError",
    "InitializerError",
    "RerunError",
    "RerunSucceededWarning",
    "TritonError",
    "RemoteTraceback",
    "SSHError",
    "SSHAuthError",
    "SSHHostKeyError",
    "SSHUnreachableError",
    "SSHPreflightError",
    "SSHClusterError",
    "ChannelError",
    "FrameTooLargeError",
    "ChannelClosedError",
    "WorkerDiedError",
    "AuthenticationError",
    "ProtocolError",
    "ActorDiedError",
    "ClusterError",
]


class MinirayError(Exception):
    """Base of every error miniray raises itself."""


class ConfigurationError(MinirayError, ValueError):
    """An argument or MINIRAY_* setting is invalid; the message names it and the fix."""


class SerializationError(MinirayError, TypeError):
    """Something that must travel between processes cannot be pickled."""


class PayloadTooLargeError(MinirayError, ValueError):
    """A task's arguments (at ``submit``) or results (on its future) cannot be stored on the
    server (over its ``maxmemory``); nothing of them was sent and the executor stays usable."""


class ServerError(MinirayError, ConnectionError):
    """The Redis-compatible server could not be started or reached."""


class ServerLostError(ServerError):
    """The connection to the server was lost while futures were pending."""


class TaskError(MinirayError):
    """A task did not finish for a reason of miniray's: over a limit, its process or worker
    died, its job was given up, its initializer raised. (A task's own exception comes back
    as itself; ``except Exception`` catches both.)"""


class TaskTimeoutError(TaskError, TimeoutError):
    """The task ran past ``Limits.timeout_seconds``; its process tree was killed."""


class MemoryLimitError(TaskError, MemoryError):
    """The task went over ``Limits.memory_gb``; its process tree was killed."""


class TaskCrashedError(TaskError):
    """The process running the task died (a signal such as SIGSEGV, or ``os._exit``)."""


class WorkerLostError(TaskError):
    """The worker holding the task stopped heartbeating and the retries were used up."""


class JobAbandonedError(TaskError):
    """The cluster gave this executor's job up: it heard nothing from the executor for longer
    than ``MINIRAY_CLIENT_GRACE_SECONDS`` (a laptop asleep, a process stopped in a debugger),
    so it dropped the job's queued tasks and unread results. The executor stays usable."""


class JobNotFoundError(MinirayError, LookupError):
    """No job with that id on the cluster (never, or it ended and its keys expired)."""


class JobNotKeptError(MinirayError):
    """The job was not started with ``keep=True``: nobody but its owner gets its results."""


class JobCancelledError(MinirayError, CancelledError):
    """The task's job was cancelled while the task was running."""


class InitializerError(TaskError, BrokenExecutor):
    """The executor's ``initializer`` raised in a task process; its tasks there cannot run."""


class RerunError(MinirayError):
    """``MinirayFuture.rerun_locally()`` cannot re-run the task: it is not done, did not fail
    or was cancelled, or its arguments or function are no longer to be had."""


class RerunSucceededWarning(UserWarning):
    """A task that failed on its worker did not fail when re-run here (``rerun_locally``)."""


class TritonError(MinirayError):
    """``miniray.triton`` cannot serve the call: no Triton server on this node (not in a task of
    a ``--triton`` worker), the server is not ready, or it refused to load/unload a model."""


class SSHError(MinirayError):
    """Base class of SSH failures; ``host`` is the host as the user named it."""

    def __init__(self, message, host=None):
        super().__init__(message)
        self.host = host


class SSHAuthError(SSHError):
    """The host refused every credential we offered (keys, agent, key files)."""


class SSHHostKeyError(SSHError):
    """The host key is not in known_hosts, or does not match the one recorded there."""


class SSHUnreachableError(SSHError):
    """No SSH server answered: DNS failure, refused or timed-out connection."""


class SSHPreflightError(SSHError):
    """Hosts' Python, cloudpickle or miniray differ from the notebook's (every host listed)."""


class SSHClusterError(SSHError):
    """Several hosts of an ``SSHCluster`` failed; ``errors`` maps each host to its error."""

    def __init__(self, message, host=None, errors=None):
        super().__init__(message, host)
        self.errors = dict(errors or {})


class ChannelError(MinirayError):
    """Base class of every error raised by ``miniray.channels``."""


class FrameTooLargeError(ChannelError):
    """A message exceeded the channel's ``max_size``."""


class ChannelClosedError(ChannelError, EOFError):
    """The other end of the channel closed the connection."""


class WorkerDiedError(ChannelClosedError):
    """The worker process exited; ``exitcode`` is its status (negative: killed by that signal)."""

    def __init__(self, message, exitcode=None):
        super().__init__(message)
        self.exitcode = exitcode


class AuthenticationError(ChannelError):
    """The shared-secret handshake with a WorkerServer failed."""


class ProtocolError(ChannelError):
    """The peer sent something this version of miniray cannot understand."""


class ActorDiedError(ChannelError):
    """The actor's process died or was closed; calls pending on it can never complete."""


class ClusterError(ChannelError):
    """A node of a ``Cluster`` failed to start its WorkerServer; the message has its output."""


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback; set as ``__cause__`` of a task's exception.

    Its ``str`` is the traceback text, so Python and IPython print the worker's frames under
    "The above exception was the direct cause of the following exception". For a task's
    exception it also has the frames as data, so a frontend can show them as local ones:
    ``frames`` (the user's frames, outermost first), ``chain`` (what the exception was raised
    from or while handling) and ``argument`` (a short repr of the item the task failed on, or
    None), as ``miniray.tracebacks.TaskTraceback`` describes them.
    """

    def __init__(self, tb: str, frames=(), chain=(), argument: str | None = None):
        super().__init__(tb)
        self.tb = tb
        self.frames, self.chain, self.argument = tuple(frames), tuple(chain), argument

    def __str__(self) -> str:
        return self.tb

    def _render_traceback_(self):  # IPython: show the worker's frames verbatim
        return self.tb.splitlines()
