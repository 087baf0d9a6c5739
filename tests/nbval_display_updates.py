"""For nbval runs (loaded by the root conftest.py when ``--nbval`` is given): apply
``update_display_data`` to the output it updates, as JupyterLab and nbclient do.

nbval 0.11 drops these messages ("unhandled iopub msg"), so it would compare a map's first
display (the live widget) with the stored notebook, which keeps what the map left when it
ended (its static snapshot: jupyter_ext/snapshot.py). A display's ``data`` and ``metadata``
are handed to nbval as NotebookNodes, which it keeps as they are (a plain dict it would copy),
so an update changes them in place.
"""

import nbval.plugin
from nbformat import NotebookNode

_read = nbval.plugin.IPyNbFile.get_kernel_message


def _get_kernel_message(self, timeout=None, stream="iopub"):
    msg = _read(self, timeout=timeout, stream=stream)
    kind, content = msg["msg_type"], msg["content"]
    display_id = (content.get("transient") or {}).get("display_id")
    shown = self.__dict__.setdefault("_miniray_displays", {})
    if kind == "display_data" and display_id:
        content["data"] = NotebookNode(content["data"])
        content["metadata"] = NotebookNode(content.get("metadata") or {})
        shown.setdefault(display_id, []).append(content)
    elif kind == "update_display_data":
        for first in shown.get(display_id, ()):
            first["data"].clear()
            first["data"].update(content["data"])
            first["metadata"].clear()
            first["metadata"].update(content.get("metadata") or {})
        msg["msg_type"] = "comm_msg"  # handled: nbval skips it without a word
    return msg


if not hasattr(_read, "_miniray_display_updates"):  # patched once, however it was imported
    _get_kernel_message._miniray_display_updates = True
    nbval.plugin.IPyNbFile.get_kernel_message = _get_kernel_message
