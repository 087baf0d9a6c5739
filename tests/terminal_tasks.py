"""Task functions and scripts for tests/test_terminal.py (importable by workers)."""

import time


def fail_some(x, every=4, seconds=0.0):
    """``x * 10`` after ``seconds``; ValueError for every ``every``-th item (0, every, ...)."""
    time.sleep(seconds)
    if x % every == 0:
        raise ValueError(f"item {x} fails")
    return x * 10


def tick(n, seconds, tag="tick"):
    """Print ``tag i`` ``n`` times, one every ``seconds``."""
    for i in range(n):
        print(f"{tag} {i}", flush=True)
        time.sleep(seconds)
    return n


# A script as a user writes one: futures through miniray.progress (errors skipped, then
# raised), a map with progress=..., on the embedded local cluster.
PROGRESS_SCRIPT = """
import miniray, terminal_tasks as t
with miniray.Executor(job_name="bar") as ex:
    futures = [ex.submit(t.fail_some, x, 4, 0.02) for x in range(24)]
    results = list(miniray.progress(futures, desc="skipping", errors="skip"))
    print("results:", len(results), results[:3], flush=True)
    squares = list(ex.map(t.fail_some, range(1, 31, 2), chunksize=2, progress="odd"))
    print("odd count", len(squares), flush=True)
    try:
        list(miniray.progress(futures, desc="raising"))
    except ValueError as e:
        print("raised:", e, flush=True)
"""

# Ctrl-C in the middle of a map with a bar: the map is cancelled, the script goes on.
INTERRUPT_SCRIPT = """
import miniray, terminal_tasks as t
ex = miniray.Executor(job_name="slow")
try:
    for v in ex.map(t.tick, [1] * 200, [0.1] * 200, progress="slow"):
        pass
except KeyboardInterrupt:
    print("caught Ctrl-C; the job is", ex.progress()["state"], flush=True)
ex.shutdown()
"""
