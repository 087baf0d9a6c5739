"""An idle slot's wait for work: one long blocking pop, ended early by work or by its worker.

A task process with nothing to do blocks on its slot's ``hand:`` and ``wake:`` lists (see
``Broker.idle`` and the claim script) for up to ``MINIRAY_IDLE_WAIT_SECONDS``. It does not wake
on a clock: work published for it pushes to one of those lists, which ends the pop at once, so
1,000 idle slots cost the server next to nothing (``bench/idle_slots.py``). What else must reach
an idle slot ends the wait too:

- its worker (a ``stop``, a ``pause``, chunks sent to it): the process watches the worker's
  pipe while it waits and, when what the worker said needs it, pushes a wake-up to its own
  ``wake:`` list over its other connection, which ends the pop (a ``stop`` is obeyed at once,
  without the pop's reply: the process is leaving);
- the server going away: the blocked read fails (ConnectionLost) as any other would; a server
  that stops answering (paused, a dead link) is given the pop's timeout and ``_SLACK`` more,
  then the connection is dropped as lost.

Liveness is the worker's business, not the slot's: the worker heartbeats and reaps, the slot
only waits.
"""

from __future__ import annotations

import time

from miniray.broker import HAND_LEN
from miniray.resp import ConnectionLost, ReplyError, ReplyTimeout

_SLACK = 30.0  # past the pop's own timeout, a server that still has not answered is lost

KEEP, WAKE, STOP = 0, 1, 2  # what ``attend`` says after the worker spoke


def wait_for_work(r_wait, r, hand_key: str, wake_key: str, seconds: float, worker_fd: int,
                  attend, then=None):
    """Block on ``hand_key``/``wake_key`` over ``r_wait`` for up to ``seconds`` (commands
    ``then(pipe)`` queues go in the same round trip, after the pop); return every reply, the
    pop's first, or None when ``attend`` said STOP.

    ``attend()`` is called each time ``worker_fd`` is readable; it reads what the worker said
    and returns KEEP (wait on), WAKE (end the wait: a wake-up is pushed over ``r``, the
    connection that is not blocked) or STOP (return at once). An error reply is raised after
    every reply has been read, as ``Pipeline.execute`` does."""
    pipe = r_wait.pipeline()
    pipe.command("BLMPOP", _seconds(seconds), 2, hand_key, wake_key, "LEFT", "COUNT", HAND_LEN)
    if then is not None:
        then(pipe)
    n = len(pipe)
    pipe.send_deferred()
    deadline = time.monotonic() + seconds + _SLACK
    woken = False
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            r_wait.close()
            raise ConnectionLost(f"the server did not answer an idle wait of {seconds:g} s "
                                 f"within {seconds + _SLACK:g} s")
        try:
            if r_wait.wait_reply_or(worker_fd, left):
                break
        except ReplyTimeout:
            continue
        what = attend()
        if what == STOP:
            return None
        if what == WAKE and not woken:
            woken = True  # (once: the worker's pipe may stay readable, at EOF say)
            r.execute("RPUSH", wake_key, "1")
        elif woken:
            time.sleep(0.001)  # the pop's reply is on its way; do not spin on a readable pipe
    try:
        replies = [r_wait.read_reply(timeout=_SLACK) for _ in range(n)]
    except ReplyTimeout:
        r_wait.close()
        raise ConnectionLost("the server stopped answering in the middle of an idle wait's "
                             "replies") from None
    for reply in replies:
        if isinstance(reply, ReplyError):
            raise reply
    return replies


def _seconds(seconds: float):
    """BLMPOP's timeout argument: whole seconds as an int (every server version takes it)."""
    return int(seconds) if seconds == int(seconds) else round(seconds, 3)
