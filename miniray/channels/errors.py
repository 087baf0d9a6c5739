"""Exceptions raised by the direct-channel layer (Worker, RemoteWorker, Cluster, actors).

Hierarchy (to be folded into ``miniray/errors.py``)::

    Exception
    └── ChannelError
        ├── FrameTooLargeError        a frame over ``max_size`` (sent or received)
        ├── ChannelClosedError        also an EOFError: the peer went away
        │   └── WorkerDiedError       the worker process exited; carries its exit code
        ├── AuthenticationError       shared-secret handshake failed
        ├── ProtocolError             the peer does not speak this protocol/version
        ├── ActorDiedError            an actor's process is gone; its pending calls fail with this
        └── ClusterError              a Cluster node failed to start its WorkerServer
    RemoteTraceback                   chained as ``__cause__`` of exceptions raised remotely
"""


class ChannelError(Exception):
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


class RemoteTraceback(Exception):
    """Carries a traceback formatted in another process, shown as the cause of the error.

    Mirrors ``concurrent.futures.process._RemoteTraceback``: the original exception keeps its
    type and this is chained as its ``__cause__`` so the remote frames appear in the report.
    """

    def __init__(self, tb):
        super().__init__(tb)
        self.tb = tb

    def __str__(self):
        return self.tb


class ClusterError(ChannelError):
    """A node of a ``Cluster`` failed to start its WorkerServer; the message has its output."""
