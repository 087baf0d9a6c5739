"""Task functions for tests/test_shm.py (importable by workers): they report what the task
process saw of shared memory."""

import os
import time

from miniray.values import shm


def double(a):
    """The array doubled, its sum, and the bytes this process mapped as arguments so far."""
    return a * 2, float(a.sum()), shm.stats["mapped_args"]


def sum_after(a, seconds, marker):
    """Says it started (``marker``), waits, returns the sum (its client may be gone by then)."""
    with open(marker, "w") as f:
        f.write(str(os.getpid()))
    time.sleep(seconds)
    return float(a.sum())


def die_once_holding(a, marker):
    """First run: leaves a half-written result in this process's own shared-memory directory,
    says its pid (``marker``) and waits to be killed. Then: the array's sum."""
    if os.path.exists(marker):
        return float(a.sum())
    with open(os.path.join(shm.ResultPlacer._own_dir(), "r-half"), "wb") as f:
        f.write(b"x" * (4 << 20))
    with open(marker + ".tmp", "w") as f:
        f.write(str(os.getpid()))
    os.rename(marker + ".tmp", marker)
    time.sleep(60)



def _kept() -> list:
    """This process's kept arguments (on ``sys``: the functions may travel by value, each
    with its own copy of this module's globals)."""
    import sys

    if not hasattr(sys, "_miniray_test_kept"):
        sys._miniray_test_kept = []
    return sys._miniray_test_kept


def keep(a):
    """Keeps its argument past its task (as a cache would); returns its sum."""
    _kept().append(a)
    return float(a.sum())


def kept_sums():
    """The sums of the arguments ``keep`` kept in this process, as they are now."""
    return [float(a.sum()) for a in _kept()]
