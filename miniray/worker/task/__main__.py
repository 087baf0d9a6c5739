"""``python -m miniray.worker.task FD PROGRESS_FD URGENT_FD``: a task process (see process.py),
started by its worker's slot (``miniray.worker.taskslot``)."""

from miniray.worker.task.process import main

main()
