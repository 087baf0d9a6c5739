"""A notebook map fed lazily: ``%%miniray map`` submits a huge input ``--buffersize`` chunks
at a time (``Executor.map_futures(..., buffersize=N)``, see ``miniray.client.feeding``) and this
module takes the futures into the ``MapRun`` as the engine makes them, so that a 10-million
item ``range`` is never pickled up front while the widget still counts against its total.
"""

from __future__ import annotations

import threading
from concurrent.futures import Future

__all__ = ["DEFAULT_BUFFERSIZE", "start_feed"]

# chunks submitted and unfinished at once: far more than the slots of a large cluster (so no
# slot waits for work), far fewer than a huge input's items (its payloads are not all made
# and stored at once)
DEFAULT_BUFFERSIZE = 4096


def start_feed(run, stream, total: int) -> threading.Thread:
    """Take ``stream``'s futures into ``run.futures`` in order (a callback on each feeds the
    model); when it ends early (cancelled, shut down, an item that cannot be sent) the items
    never submitted are counted as cancelled, and an error is kept as the failure of the
    first of them, so that ``run.wait()`` always ends."""
    t = threading.Thread(target=_take, args=(run, stream, total), daemon=True,
                         name=f"miniray-feed-view-{run.job}")
    t.start()
    return t


def _take(run, stream, total: int) -> None:
    futures = run.futures
    error = None
    try:
        for i, f in enumerate(stream):
            futures.append(f)
            f.add_done_callback(lambda f, i=i: run._item_done(i, f))
    except BaseException as e:  # the feeding stopped: cancelled, or an item cannot travel
        error = e
    n = len(futures)
    if n >= total:
        return
    if error is not None and not run._cancel_requested and not isinstance(
            error.__cause__ or error, RuntimeError):
        failed = Future()  # the item it stopped at fails with why (run.errors shows it)
        failed.set_exception(error)
        futures.append(failed)
        if run.model.item_finished(n, error):
            run._finish()
        n += 1
    if n < total and run.model.items_unfed(total - n):
        run._finish()
