"""Atomic operations on the Redis key schema (``keys.py``): Lua scripts and their Python calls.

Every state change that touches more than one key happens in one script, so a crash between
two commands can never lose or duplicate a task: claiming moves a chunk from its job's queue
into the worker's ``wip`` hash in one step; the reaper moves a dead worker's ``wip`` back.
Scripts build key names with the same spelling as ``keys.py`` (see its table).

    client (Executor)                    server keys                 worker (task slots)
    -----------------                    -----------                 -------------------
    create_job ----------------------> job:{job}
    publish, publish_one ------------> q:{job}, jobs
                                         wake:{slot} ---------------> a waiting slot wakes
                                         hand:{slot} (publish_one) -> ... or is handed a chunk
                                         wip:{worker} <-------------- claim (q -> wip)
                                         idle <---------------------- idle (nothing to claim)
    reads res:{client} <---------------- res:{client} <-------------- complete (wip out, counts)
    cancel_chunk, stop_chunks, --------> stop:{job}, job:{job} -----> heartbeat (hears stops
      cancel_job, seal                   workers, worker:{wid} <----   and closed jobs)
    reap (upkeep) ---------------------> a dead worker's wip <------- reap (each worker too):
                                           requeued, or its items fail; release: a worker
                                           that leaves hands its wip back

- ``calls``: ``Broker`` (the scripts bound to a connection and namespace, called by hash),
  ``connect``, ``parse_claim``, ``job_ttl``, ``HAND_LEN``.
- ``lua_prelude``: the Lua helpers every script starts with.
- ``lua_client``: publish, publish_one, cancel_chunk, stop_chunks, cancel_job, seal.
- ``lua_worker``: claim, idle, complete.
- ``lua_liveness``: heartbeat, reap, release.
- ``lua_cache``: cache_store, cache_clear (``miniray.client.cache``).
"""

from miniray.resp import redact

from .calls import HAND_LEN, Broker, connect, job_ttl, parse_claim

__all__ = ["HAND_LEN", "Broker", "connect", "job_ttl", "parse_claim"]

_redact = redact  # (what the broker's importers have long called it)
