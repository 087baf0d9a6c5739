"""Triton's HTTP API, spoken with ``http.client`` (neither the worker nor ``load_model`` needs
``tritonclient``): health (``server_ready``, ``model_ready``), the repository index
(``loaded_models``) and loading or unloading a model (``repository_call``).
"""

from __future__ import annotations

import http.client
import json
from urllib.parse import quote

from miniray.errors import TritonError

__all__ = ["http_request", "loaded_models", "model_ready", "repository_call", "server_ready"]


def http_request(hostport: str, method: str, path: str, body: dict | None = None,
                 timeout: float = 5.0) -> tuple[int, bytes]:
    """One request to Triton's HTTP endpoint; raises OSError/HTTPException when unreachable."""
    conn = http.client.HTTPConnection(hostport, timeout=timeout)
    try:
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"} if data is not None else {}
        conn.request(method, path, body=data, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def server_ready(hostport: str, timeout: float = 2.0) -> bool:
    try:
        return http_request(hostport, "GET", "/v2/health/ready", timeout=timeout)[0] == 200
    except (OSError, http.client.HTTPException):
        return False


def model_ready(hostport: str, model: str, timeout: float = 5.0) -> bool:
    try:
        status, _ = http_request(hostport, "GET", f"/v2/models/{quote(model, safe='')}/ready",
                                 timeout=timeout)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200


def loaded_models(hostport: str, timeout: float = 5.0) -> list[str]:
    """Names of the models the server has READY (its repository index)."""
    status, body = http_request(hostport, "POST", "/v2/repository/index", {}, timeout=timeout)
    if status != 200:
        return []
    return sorted({m["name"] for m in json.loads(body) if m.get("state") == "READY"})


def repository_call(hostport: str, model: str, action: str, timeout: float) -> None:
    """``action`` ("load" or "unload") ``model``; TritonError with the server's reason."""
    where = f"the Triton server at http://{hostport}"
    try:
        status, body = http_request(
            hostport, "POST", f"/v2/repository/models/{quote(model, safe='')}/{action}", {},
            timeout=timeout)
    except (OSError, http.client.HTTPException) as e:
        raise TritonError(
            f"could not {action} model {model!r}: {where} did not answer ({e}). It may be "
            "restarting (the worker restarts a server that died); try again, and see "
            "`miniray status` for its state") from None
    if status != 200:
        try:
            reason = json.loads(body).get("error") or body.decode(errors="replace")
        except ValueError:
            reason = body.decode(errors="replace")
        hint = (" Check that the model repository (--triton-models) has a folder "
                f"{model}/ with config.pbtxt and a version folder such as 1/, and that the "
                "server runs with --model-control-mode=explicit (a managed one does)."
                if action == "load" else "")
        raise TritonError(f"{where} could not {action} model {model!r}: {reason}.{hint}")
