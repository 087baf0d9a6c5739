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


def make_array(nbytes, fill):
    """A float64 array of ``nbytes`` bytes, every element ``fill`` (W6: a big result)."""
    import numpy as np
    return np.full(nbytes // 8, float(fill), dtype=np.float64)


def map_chunk(fn, items):
    """Apply ``fn`` to a chunk: how engines without a ``chunksize`` (Dask, Ray) batch a map."""
    return [fn(x) for x in items]

