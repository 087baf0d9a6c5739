"""Where a cluster comes from: its server, its workers, and who owns them.

A cluster is one Redis-compatible server plus ``miniray worker`` processes that reach it::

    local.py       LocalCluster: server.py's private redis-server/valkey-server on a unix
                   socket (random password) + one ``python -m miniray.worker`` per core,
                   owned by this process (``miniray.init()``, or any Executor() with no URL)
    persistent.py  the same, run by a per-user background service (service.py) that outlives
                   the kernel: ``init(persist=True)``, ``miniray up --detach``, found again
                   through a 0600 cluster file
    ssh/           SSHCluster: workers on machines you can ``ssh`` into, reaching this
                   machine's loopback-only server through reverse tunnels

Nothing here runs tasks or reads results: workers are ``miniray.worker``, the user's side is
``miniray.client``. ``local.before_stop(fn)`` is how the client's executors shut down before
the embedded cluster they use goes away.
"""
