"""The client: what runs in the user's process, from ``Executor.submit`` to a settled future.

::

    Executor (executor.py, a facade)
      submit/map/map_futures --> outbox.py --[flusher thread: one pipeline]--> server --> workers
      futures.py <-- delivery.py <-- results.py --[reader: res:{client}, and the inbox of
                                                   this machine's task processes]-- workers
      lifecycle.py: the job's life on the server (create, renew, seal, cancel, close)

Around it: ``feeding.py`` (lazy, bounded map inputs: ``buffersize``), ``outcomes.py`` (cancels,
Ctrl-C'd chunks, item timings), ``limits.py`` and ``comma.py`` (per-job limits; comma's names),
``keep.py`` and ``jobhandle.py`` (jobs that outlive the client: ``keep=True``,
``miniray.attach``), ``cache.py`` (cached map items), ``rerun.py`` (a failed task re-run here).
Read-only views of a cluster, for anyone connected to it: ``observe.py`` (progress, events,
logs, workers), ``jobs.py`` and ``logview.py`` (``miniray jobs``/``logs``), ``progressbar.py``
(``miniray.progress``, a tqdm bar in a terminal).
"""
