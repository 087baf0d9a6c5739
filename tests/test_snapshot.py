"""A saved notebook keeps each map's final state: executed in a real kernel (nbclient, which
applies display updates as JupyterLab does), saved and read back, a map's output is static
HTML (bar, counts, error table, last log lines) and text, not a widget reference that a
reopened notebook, GitHub or nbviewer cannot show ("model not found")."""

import os

import pytest

nbformat = pytest.importorskip("nbformat")
pytest.importorskip("nbclient")
pytest.importorskip("anywidget")

pytestmark = pytest.mark.timeout(150)

WIDGET = "application/vnd.jupyter.widget-view+json"
CELLS = [
    "%load_ext miniray",
    "%%miniray map x in range(30) -o out --chunksize 3\n"
    "print(f'item {x} <says> hi')\n"
    "x * 2",
    "%%miniray map x in range(6) -o bad\n1 / (x % 3)",
]


def _run(tmp_path):
    from nbclient import NotebookClient
    from nbformat.v4 import new_code_cell, new_notebook

    nb = new_notebook(cells=[new_code_cell(c) for c in CELLS])
    env_keep = {k: os.environ.get(k) for k in ("MINIRAY_REDIS_URL", "MINIRAY_NAMESPACE")}
    for k in env_keep:
        os.environ.pop(k, None)
    os.environ["MINIRAY_LOCAL_WORKERS"] = "2"
    try:
        NotebookClient(nb, kernel_name="python3", timeout=60, allow_errors=True,
                       resources={"metadata": {"path": str(tmp_path)}}).execute()
    finally:
        os.environ.pop("MINIRAY_LOCAL_WORKERS", None)
        os.environ.update({k: v for k, v in env_keep.items() if v is not None})
    path = tmp_path / "saved.ipynb"
    nbformat.write(nb, str(path))
    return nbformat.read(str(path), as_version=4)


def _displays(cell):
    return [o for o in cell.outputs if o.output_type == "display_data"]


def test_a_saved_notebook_shows_each_maps_final_state_as_static_html(tmp_path):
    nb = _run(tmp_path)
    ok, bad = nb.cells[1], nb.cells[2]
    (shown,) = _displays(ok)
    assert WIDGET not in shown.data, shown.data.keys()
    assert set(shown.data) == {"text/plain", "text/html"}
    assert shown.data["text/plain"].startswith("miniray map 'map x in range(30)' done: 30/30")
    page = shown.data["text/html"]
    assert 'class="miniray-snapshot"' in page and "30 done · 0 failed" in page
    assert "100%" in page and 'class="miniray-bar-done"' in page
    assert "item 29 &lt;says&gt; hi" in page  # the last log lines, escaped
    assert "var(--jp-" in page and "#fff" not in page.lower()  # theme colours, no white
    (shown,) = _displays(bad)
    assert WIDGET not in shown.data
    page = shown.data["text/html"]
    assert "4 done · 2 failed" in page and "66%" in page
    assert "<details>" in page and "ZeroDivisionError" in page and "items 0, 3" in page
    assert "division by zero" in page
    assert "logs" not in page  # it printed nothing: no empty log pane
    assert bad.outputs[-1].output_type == "error"  # the cell still raises the first error
