"""The exception tree of miniray, in one module.

A task's own exception comes back as itself (same type and args) with the worker's traceback
chained as ``__cause__`` (a :class:`RemoteTraceback`); the classes below are for what miniray
itself has to report::

    MinirayError
     ├── ConfigurationError      (ValueError)       a bad argument or MINIRAY_* setting
     ├── SerializationError      (TypeError)        a function, argument, result or exception
     │                                              that cannot be pickled
     ├── ServerError             (ConnectionError)  the Redis server cannot be started/reached
     │    └── ServerLostError                       the server went away while work was pending
     ├── TaskTimeoutError        (TimeoutError)     over Limits.timeout_seconds; tree was killed
     ├── MemoryLimitError        (MemoryError)      over Limits.memory_gb; tree was killed
     ├── TaskCrashedError                           the task's process died (signal, os._exit)
     ├── WorkerLostError                            its worker died, retries were used up
     └── JobCancelledError       (CancelledError)   the job was cancelled while the task ran

Builtin ``concurrent.futures.CancelledError`` and ``TimeoutError`` are what ``Future``
raises for a cancelled future or an elapsed ``result(timeout=...)``, as with any executor.
"""

from __future__ import annotations

from concurrent.futures import CancelledError

__all__ = [
    "MinirayError",
    "ConfigurationError",
    "SerializationError",
    "ServerError",
    "ServerLostError",
    "TaskTimeoutError",
    "MemoryLimitError",
    "TaskCrashedError",
    "WorkerLostError",
    "JobCancelledError",
    "RemoteTraceback",
]


class MinirayError(Exception):
    """Base of every error miniray raises itself."""


class ConfigurationError(MinirayError, ValueError):
    """An argument or MINIRAY_* setting is invalid; the message names it and the fix."""


class SerializationError(MinirayError, TypeError):
    """Something that must travel between processes cannot be pickled."""


class ServerError(MinirayError, ConnectionError):
    """The Redis-compatible server could not be started or reached."""


class ServerLostError(ServerError):
    """The connection to the server was lost while futures were pending."""


class TaskTimeoutError(MinirayError, TimeoutError):
    """The task ran past ``Limits.timeout_seconds``; its process tree was killed."""


class MemoryLimitError(MinirayError, MemoryError):
    """The task went over ``Limits.memory_gb``; its process tree was killed."""


class TaskCrashedError(MinirayError):
    """The process running the task died (a signal such as SIGSEGV, or ``os._exit``)."""


class WorkerLostError(MinirayError):
    """The worker holding the task stopped heartbeating and the retries were used up."""


class JobCancelledError(MinirayError, CancelledError):
    """The task's job was cancelled while the task was running."""


class RemoteTraceback(Exception):
    """Carries the worker's formatted traceback; set as ``__cause__`` of a task's exception.

    Its ``str`` is the traceback text, so Python and IPython print the worker's frames under
    "The above exception was the direct cause of the following exception".
    """

    def __init__(self, tb: str):
        super().__init__(tb)
        self.tb = tb

    def __str__(self) -> str:
        return self.tb

    def _render_traceback_(self):  # IPython: show the worker's frames verbatim
        return self.tb.splitlines()
