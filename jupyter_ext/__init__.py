"""The notebook face of miniray: ``%load_ext miniray`` magics and live progress widgets.

It uses only miniray's public API; the engine never imports it (``miniray`` loads it lazily
from ``load_ipython_extension``), so workers never import IPython or ipywidgets.
"""

from __future__ import annotations

__all__ = ["load_ipython_extension", "MapRun", "MinirayMagics"]


def load_ipython_extension(ipython) -> None:
    """``%load_ext miniray`` (or ``%load_ext jupyter_ext``): register ``%miniray``/``%%miniray``."""
    from .magics import MinirayMagics

    ipython.register_magics(MinirayMagics)


def __getattr__(name):
    if name == "MapRun":
        from .run import MapRun

        return MapRun
    if name == "MinirayMagics":
        from .magics import MinirayMagics

        return MinirayMagics
    raise AttributeError(f"module 'jupyter_ext' has no attribute {name!r}")
