"""The task process: a worker's child that claims chunks, runs them and completes them.

::

    taskslot (worker) --socket: hello, chunks--> process.Runner --claim/complete--> Redis
                      <--claimed/done notes----        |  run.py: the function, item by item
                      <--page: chunk, item, start--    |  (itemblocks.py: small items in blocks)
                                                       |  results.py: the result message
                                                       +  logs.py: captured lines (output.py)

``python -m miniray.worker.task FD PROGRESS_FD URGENT_FD`` starts one (``__main__.py``).
This package imports nothing, so that a task process starts light.
"""
