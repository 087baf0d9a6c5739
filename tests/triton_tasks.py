"""Task functions for the Triton tests, importable by workers (they run in the Triton venv)."""

import os

ADD_ONE_CONFIG = """\
name: "add_one"
backend: "python"
max_batch_size: 0
input [ { name: "INPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
output [ { name: "OUTPUT0", data_type: TYPE_FP32, dims: [ -1 ] } ]
instance_group [ { count: 1, kind: KIND_CPU } ]
"""

ADD_ONE_MODEL = """\
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        responses = []
        for request in requests:
            x = pb_utils.get_input_tensor_by_name(request, "INPUT0").as_numpy()
            out = pb_utils.Tensor("OUTPUT0", (x + 1).astype(np.float32))
            responses.append(pb_utils.InferenceResponse(output_tensors=[out]))
        return responses
"""


def write_model_repository(path):
    """A repository with one Python-backend model: add_one (FP32 vector in, input + 1 out)."""
    version = path / "add_one" / "1"
    version.mkdir(parents=True)
    (path / "add_one" / "config.pbtxt").write_text(ADD_ONE_CONFIG)
    (version / "model.py").write_text(ADD_ONE_MODEL)
    return path


def add_one(values, protocol="http"):
    """Infer on the node's Triton server; returns the output and which server answered."""
    import numpy as np

    import miniray.triton

    if protocol == "http":
        import tritonclient.http as tc
    else:
        import tritonclient.grpc as tc
    x = np.asarray(values, dtype=np.float32)
    inp = tc.InferInput("INPUT0", list(x.shape), "FP32")
    inp.set_data_from_numpy(x)
    out = miniray.triton.client(protocol).infer("add_one", [inp]).as_numpy("OUTPUT0")
    return [float(v) for v in out], os.environ.get("MINIRAY_TRITON_SERVER")


def model_ready(name):
    from miniray.triton.httpapi import model_ready
    from miniray.triton.server import ENV_HTTP

    return model_ready(os.environ[ENV_HTTP], name)


def load_model(name, stale_after_seconds=None):
    import miniray.triton

    miniray.triton.load_model(name, stale_after_seconds=stale_after_seconds)
    return model_ready(name)


def unload_model(name):
    import miniray.triton

    miniray.triton.unload_model(name)
    return model_ready(name)


def triton_client():
    import miniray.triton

    return type(miniray.triton.client()).__name__
