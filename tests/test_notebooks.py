"""Every notebook in notebooks/ runs top to bottom under ``pytest --nbval`` and its outputs
match the stored ones (timings, hosts and workers sanitised by tests/nbval_sanitize.cfg), run
as a developer runs them by hand: ``python -m pytest --nbval notebooks/``."""

import glob
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOKS = sorted(glob.glob(os.path.join(ROOT, "notebooks", "*.ipynb")))

pytest.importorskip("nbval")
pytest.importorskip("ipykernel")


def test_there_are_notebooks():
    names = [os.path.basename(p) for p in NOTEBOOKS]
    for name in ("01-quickstart.ipynb", "02-executor-api.ipynb", "03-errors-and-limits.ipynb"):
        assert name in names


@pytest.mark.timeout(150)
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=os.path.basename)
def test_notebook_runs_and_matches_its_outputs(notebook):
    # the check by hand, as nbval's docs give it: the root conftest.py supplies the sanitising
    # rules, display updates, this environment's kernel and the embedded local cluster
    cmd = [sys.executable, "-m", "pytest", "--nbval", "--nbval-cell-timeout", "60", "-q",
           os.path.relpath(notebook, ROOT)]
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}  # this run's, not its
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=140)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
