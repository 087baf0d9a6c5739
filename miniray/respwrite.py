"""Writing commands to the server (``resp.Connection``'s send side): RESP-encoded into as few
buffers as possible without copying big values (``pack_commands``), and Ctrl-C held while the
main thread writes (``hold_ctrl_c`` / ``release_ctrl_c``), so that the server gets whole
commands and a connection is never left with half of one.
"""

from __future__ import annotations

import signal
import threading

import hiredis

__all__ = ["hold_ctrl_c", "pack_commands", "release_ctrl_c"]

_BIG = 256 * 1024


def _has_big(cmd) -> bool:
    for a in cmd:  # (a plain loop: this runs for every command sent)
        t = type(a)
        if t is bytes or t is bytearray:
            if len(a) >= _BIG:
                return True
        elif t is memoryview and a.nbytes >= _BIG:
            return True
    return False


def pack_commands(commands) -> list:
    """RESP-encode commands into as few buffers as possible, without copying big values."""
    out, small = [], []
    pack = hiredis.pack_command
    for cmd in commands:
        if not _has_big(cmd):
            small.append(pack(cmd))
            continue
        parts = [b"*%d\r\n" % len(cmd)]
        for a in cmd:
            if isinstance(a, (bytes, bytearray, memoryview)):
                view = memoryview(a).cast("B") if isinstance(a, memoryview) else a
                n = view.nbytes if isinstance(view, memoryview) else len(view)
                if n >= _BIG:
                    small.append(b"".join(parts) + b"$%d\r\n" % n)
                    out.append(b"".join(small))
                    small, parts = [], []
                    out.append(view)
                    parts.append(b"\r\n")
                    continue
                data = bytes(view)
            elif isinstance(a, str):
                data = a.encode()
            elif isinstance(a, (int, float)):
                data = repr(a).encode() if isinstance(a, float) else b"%d" % a
            else:
                raise TypeError(f"cannot send {type(a).__name__} to Redis")
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        small.append(b"".join(parts))
    if small:
        out.append(b"".join(small))
    return out


class _CtrlC:
    """Ctrl-C held while the main thread writes commands (``hold_ctrl_c``): the
    process's SIGINT handler is wrapped, once, by one that notes a Ctrl-C during a write and
    passes it on (KeyboardInterrupt) when the write is whole, so that the commands a caller
    sent are the ones the server got. A second Ctrl-C during the same write (a server that
    does not read: the write blocks) passes on at once; the connection is then closed.
    Wrapping once costs a lookup per write, where setting a handler per write cost ~10 us
    on the latency path. A handler set later (ipykernel sets one per cell) is wrapped anew."""

    depth = 0
    held = 0
    inner = None


def _ctrl_c_handler(signum, frame):
    if _CtrlC.depth and not _CtrlC.held:
        _CtrlC.held = signum
        return
    _CtrlC.held = 0
    inner = _CtrlC.inner
    if callable(inner):
        inner(signum, frame)


_MAIN = threading.main_thread()


def hold_ctrl_c() -> bool:
    """Start holding Ctrl-C for a write (see ``_CtrlC``); False where it cannot be held (not
    the main thread, or a SIGINT handler that is not Python's). Plain calls, not a context
    manager: this is on every write."""
    if threading.current_thread() is not _MAIN:
        return False
    current = signal.getsignal(signal.SIGINT)
    if current is not _ctrl_c_handler:
        if not callable(current):  # ignored, the default action, or not set from Python
            return False
        try:
            signal.signal(signal.SIGINT, _ctrl_c_handler)
        except (ValueError, OSError):
            return False
        _CtrlC.inner = current
    _CtrlC.depth += 1
    return True


def release_ctrl_c() -> None:
    """End a hold: a Ctrl-C that came during it is passed on now (KeyboardInterrupt)."""
    _CtrlC.depth -= 1
    if not _CtrlC.depth and _CtrlC.held:
        signum, _CtrlC.held = _CtrlC.held, 0
        if callable(_CtrlC.inner):
            _CtrlC.inner(signum, None)
