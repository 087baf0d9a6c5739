"""Helpers shared by the channel tests (a plain module: `conftest` is ambiguous across dirs)."""

import os
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
# Remote and server-side workers import miniray and the test work functions from here.
PYTHONPATH = os.pathsep.join([str(REPO), str(HERE)])


def wait_gone(pid, timeout=10.0):
    """True once ``pid`` no longer exists (or is a zombie) within ``timeout``."""
    import psutil

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if psutil.Process(pid).status() == psutil.STATUS_ZOMBIE:
                return True
        except psutil.NoSuchProcess:
            return True
        time.sleep(0.02)
    return False
