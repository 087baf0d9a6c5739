"""Big payloads and the server's limits: how big one stored field may be, and whether a
payload fits in the server's memory at all, asked only when a payload is big.

A field (or a command's argument) longer than the server's ``proto-max-bulk-len`` (512 MB by
default) makes it drop the connection, so big payloads travel in parts (``protocol``); one
bigger than the server's free ``maxmemory`` cannot be stored at all, so it fails at
``submit`` with an error naming both sizes, instead of an error reply that would leave the
executor unsure what the server took.
"""

from __future__ import annotations

import threading

from miniray.errors import PayloadTooLargeError
from miniray.protocol import SMALLEST_BULK_LIMIT, part_size
from miniray.resp import RedisError, ReplyError

__all__ = ["BIG", "SMALL_PART", "big_part_size", "check_room"]

SMALL_PART = SMALLEST_BULK_LIMIT - 4096  # what any server takes in one field
BIG = SMALL_PART  # payloads from this size on are checked against the server's limits

_bulk_limits: dict = {}  # server URL -> its proto-max-bulk-len (0: it would not say)
_lock = threading.Lock()


def big_part_size(conn) -> int:
    """The part size for a big payload on ``conn``'s server (its limit is asked once)."""
    with _lock:
        limit = _bulk_limits.get(conn.url)
    if limit is None:
        try:
            got = conn.execute("CONFIG", "GET", "proto-max-bulk-len")
            limit = int(got[1]) if got else 0
        except (ReplyError, ValueError, IndexError):  # CONFIG refused: assume the default
            limit = 0
        except RedisError:  # no answer (lost, hung): the default now, ask again next time
            return part_size(None)
        with _lock:
            _bulk_limits[conn.url] = limit
    return part_size(limit or None)


def _human(n: int) -> str:
    for unit in ("bytes", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} bytes"


def check_room(conn, size: int, what: str) -> None:
    """Raise ``PayloadTooLargeError`` when a payload of ``size`` bytes cannot fit in the
    memory the server may still use (``maxmemory`` with no eviction of our keys)."""
    try:
        info = conn.execute("INFO", "memory")
    except RedisError:
        return  # INFO refused: the store itself will say
    fields = dict(line.split(":", 1) for line in info.decode().splitlines() if ":" in line)
    try:
        used, cap = int(fields["used_memory"]), int(fields.get("maxmemory", 0))
    except (KeyError, ValueError):
        return
    policy = fields.get("maxmemory_policy", "noeviction")
    if cap and not policy.startswith("allkeys") and used + size > cap:
        raise PayloadTooLargeError(
            f"the {what} take {_human(size)}, and the server has {_human(max(0, cap - used))} "
            f"left under its maxmemory of {_human(cap)} ({_human(used)} in use): nothing was "
            "sent. Pass less data per task (or a path to it), or raise the server's maxmemory.")


def refused(size: int, what: str, reply) -> PayloadTooLargeError:
    """The error of a big payload that the server refused to store (``reply``)."""
    return PayloadTooLargeError(
        f"the server refused to store the {what} ({_human(size)}): {reply}. Nothing of it "
        "was kept; pass less data per task (or a path to it), or give the server more memory "
        "(maxmemory).")
