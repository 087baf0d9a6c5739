"""The worker side: ``miniray worker``, its slot threads and their task processes.

::

    cli.main --> supervisor.Worker --+-- heartbeat thread: worker:{id}, workers; reaps dead
                                     |   workers; cancels (stop:{job}) --> the slots
                                     +-- slot.Slot threads (one per slot), each owning a
                                         taskslot.TaskProcess:

    Redis                                 task process (task/)              slot thread
    -----                                 --------------------              -----------
    hand:, wake:{slot} --claim (BLMPOP)-> process.Runner: runs chunks   --> claimed/done
    res:{client}, logs:{job} <-complete-- (run.py), outcomes, log lines     timeouts, cancels
    wip:{worker} (tagged with the slot)   (results.py, logs.py)             deaths (slotdeath)
                                                                            resends

A task process claims, runs and completes by itself (``task/claims.py``: claim from Redis, run,
complete, wait idle), so a task's round trip has no hop through the worker process; on a GPU
worker the slot thread claims instead, under the GPU lock (``gpu``), and sends chunks to its
process. The slot thread supervises: it hears what the process holds and delivered, kills it
past a timeout or a cancel's grace, explains its death to the futures and resends what it
held. A task process applies its limits before it unpickles anything (``isolation``: memory
cgroup or RLIMIT_AS, CPUs; ``gpu``: CUDA_VISIBLE_DEVICES) and keeps what its tasks leave
running in check. Small results go straight to a client on the same machine
(``miniray.values``). ``python -m miniray.worker`` is ``miniray worker``.

``task/`` is the task process (``python -m miniray.worker.task``, started by ``taskslot``):
``process.py`` its loop, ``run.py`` a chunk, ``itemblocks.py`` many small items at C speed,
``claims.py``/``idlewait.py`` its round trips with Redis, ``functions.py``, ``results.py``,
``logs.py``/``output.py`` (captured prints), ``page.py`` (what the slot reads while it runs).

This package imports nothing: every task process imports it.
"""
