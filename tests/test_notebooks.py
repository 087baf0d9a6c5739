"""Every notebook in notebooks/ runs top to bottom under ``pytest --nbval`` and its outputs
match the stored ones (timings, hosts and workers sanitised by tests/nbval_sanitize.cfg)."""

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
def test_notebook_runs_and_matches_its_outputs(notebook, tmp_path):
    env = dict(os.environ)
    # the notebooks run on the embedded local cluster, as a new user's would
    for var in ("MINIRAY_REDIS_URL", "MINIRAY_NAMESPACE"):
        env.pop(var, None)
    env.setdefault("MINIRAY_LOCAL_WORKERS", "2")
    # nbval applies display updates (a map's snapshot replaces its widget) as JupyterLab does
    here = os.path.join(ROOT, "tests")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [here, env.get("PYTHONPATH")]))
    cmd = [sys.executable, "-m", "pytest", "-p", "nbval_display_updates",
           "--nbval", "--nbval-current-env",
           "--nbval-sanitize-with", os.path.join(ROOT, "tests", "nbval_sanitize.cfg"),
           "--nbval-cell-timeout", "60", "-p", "no:cacheprovider", "-q",
           "--rootdir", str(tmp_path), "-c", os.devnull, notebook]
    proc = subprocess.run(cmd, cwd=os.path.dirname(notebook), env=env, capture_output=True,
                          text=True, timeout=140)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
