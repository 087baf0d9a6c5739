"""Finding the ``tritonserver`` binary a managed server runs (``MINIRAY_TRITON_BIN``, PATH, or
the ``nvidia-pytriton`` wheel's), and what the wheel's binary needs to run (``wheel_setup``:
its Python backend stub for this Python, its library folders).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
import sysconfig
from pathlib import Path

from miniray.errors import ConfigurationError

__all__ = ["find_binary", "wheel_setup"]


def find_binary(setting: str | None = None) -> str:
    """``setting`` (MINIRAY_TRITON_BIN), else ``tritonserver`` on PATH, else the wheel's."""
    if setting:
        if not (os.path.isfile(setting) and os.access(setting, os.X_OK)):
            raise ConfigurationError(
                f"MINIRAY_TRITON_BIN={setting!r} is not an executable file; point it at a "
                "tritonserver binary, or unset it to search PATH and the nvidia-pytriton wheel")
        return setting
    found = shutil.which("tritonserver")
    if found:
        return found
    spec = importlib.util.find_spec("pytriton")
    for loc in (spec.submodule_search_locations or []) if spec else []:
        candidate = os.path.join(loc, "tritonserver", "bin", "tritonserver")
        if os.path.isfile(candidate):
            return candidate
    raise ConfigurationError(
        "`miniray worker --triton` found no tritonserver binary: none on PATH, "
        f"MINIRAY_TRITON_BIN unset, and no nvidia-pytriton wheel in this Python "
        f"({sys.executable}). Install it next to miniray (pip install nvidia-pytriton, in a "
        "virtual environment of its own: it pins numpy<2), set MINIRAY_TRITON_BIN, or attach "
        "to a running server with --triton-url URL")


def wheel_setup(binary: str, workdir: Path) -> tuple[list, list]:
    """Flags and library folders for the nvidia-pytriton wheel's server (as pytriton does it).

    The wheel keeps one Python backend stub per Python version; the backend looks for its
    stub next to itself, so the backends folder is copied to ``workdir`` with the stub of the
    Python running this worker (whose environment the models' ``model.py`` then use). Other
    binaries (a Triton container's) keep their own backend directory.
    """
    root = Path(binary).resolve().parent.parent  # .../site-packages/pytriton/tritonserver
    stubs = root / "python_backend_stubs"
    if not stubs.is_dir():
        return [], []
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = stubs / version / "triton_python_backend_stub"
    if not stub.is_file():
        have = sorted(p.name for p in stubs.iterdir())
        raise ConfigurationError(
            f"the tritonserver of the nvidia-pytriton wheel at {root} has no Python backend "
            f"stub for Python {version} (it has {', '.join(have)}); run the worker with one "
            "of those Python versions")
    backends = workdir / "backends"
    shutil.copytree(root / "backends", backends)
    shutil.copy2(stub, backends / "python" / "triton_python_backend_stub")
    libs = [str(p) for p in (root.parent.parent / "nvidia_pytriton.libs", root / "external_libs")
            if p.is_dir()]
    # the stub embeds libpython3.X: prefer this Python's own (a pyenv or conda Python), which
    # matches its standard library, over whatever the system has (or lacks)
    libdir = sysconfig.get_config_var("LIBDIR")
    if libdir and os.path.exists(os.path.join(libdir, f"libpython{version}.so.1.0")):
        libs.insert(0, libdir)
    return [f"--backend-directory={backends}", f"--cache-directory={root / 'caches'}"], libs
