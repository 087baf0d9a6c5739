"""The notebooks' check by hand, as nbval's docs give it: ``python -m pytest --nbval notebooks/``.

nbval takes its settings from the command line only, so this file gives a run with ``--nbval``
(or ``--nbval-lax``) what tests/test_notebooks.py relies on, unless the command line says
otherwise: the sanitising rules (tests/nbval_sanitize.cfg: timings, hosts, workers), display
updates applied as JupyterLab does (tests/nbval_display_updates.py), a kernel in this Python
environment, and the embedded local cluster with the 2 workers the stored outputs were made with.
Without ``--nbval`` it does nothing: README's ``python -m pytest`` collects ``testpaths`` as before.
"""

import atexit
import importlib.util
import os
import shutil
import sys
import tempfile

_TESTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tests")


def pytest_configure(config):
    opt = config.option
    if not (getattr(opt, "nbval", False) or getattr(opt, "nbval_lax", False)):
        return
    if opt.nbval_sanitize_with is None:
        opt.nbval_sanitize_with = os.path.join(_TESTS, "nbval_sanitize.cfg")
    if not opt.nbval_kernel_name:
        # nbval's default, the "python3" kernelspec, can be a Python without this checkout
        opt.nbval_current_env = True
    if "nbval_display_updates" not in sys.modules:  # `-p nbval_display_updates` loaded it
        spec = importlib.util.spec_from_file_location(
            "nbval_display_updates", os.path.join(_TESTS, "nbval_display_updates.py"))
        module = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = module
        spec.loader.exec_module(module)
    # the kernels inherit this environment: the embedded local cluster, never a configured
    # server or a persistent cluster the developer runs (`miniray up --detach`)
    for var in ("MINIRAY_REDIS_URL", "MINIRAY_NAMESPACE"):
        os.environ.pop(var, None)
    os.environ["MINIRAY_LOCAL_WORKERS"] = "2"
    os.environ["MINIRAY_CLUSTER_DIR"] = tempfile.mkdtemp(prefix="miniray-nbval-clusters-")
    atexit.register(shutil.rmtree, os.environ["MINIRAY_CLUSTER_DIR"], True)
