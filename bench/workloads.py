"""Task functions the benchmarks submit, kept in an importable module.

Every engine pickles these by reference (``workloads.inc``), so no engine pays for shipping
function bodies; ``bench/`` reaches the workers through ``PYTHONPATH`` (see ``measure.py``).
"""


def noop(*args):
    return None


def inc(x):
    return x + 1


def array_sum(arr):
    return float(arr.sum())


def map_chunk(fn, items):
    """Apply ``fn`` to a chunk: how engines without a ``chunksize`` (Dask, Ray) batch a map."""
    return [fn(x) for x in items]

