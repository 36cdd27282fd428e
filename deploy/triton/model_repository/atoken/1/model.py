"""Triton Python backend: the AToken model behind Triton's dynamic batcher.

Each request is one job (see service/triton_io.py). Triton hands `execute` every request its
dynamic batcher grouped; they run as one packed encoder pass and one packed decoder pass
through the same Engine the in-process worker uses. The model comes from the ATOKEN_*
environment (checkpoint, config, dtype, device), exactly as for the HTTP service.
"""

import os
import sys

# The backend stub's embedded interpreter ignores PYTHONPATH; a virtual environment outside
# the image's own site-packages is named here instead (service/triton_launch.py sets it).
sys.path[:0] = [p for p in os.environ.get("ATOKEN_PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.dlpack  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from service.settings import Settings  # noqa: E402
from service.triton_io import inputs_to_job, pack_json, result_to_outputs, unpack_json  # noqa: E402
from service.worker.backends import canary, describe  # noqa: E402
from service.worker.engine import Engine  # noqa: E402
from service.worker.jobs import JobResult  # noqa: E402
from service.worker.loader import load_tokenizers  # noqa: E402

INPUTS = ("META", "FEATS", "PIXELS", "COORDS", "INDICES")


class TritonPythonModel:
    def initialize(self, args):
        spec = Settings().model_spec
        tokenizers = load_tokenizers(spec)
        self.engine = Engine(tokenizers, spec.engine_lanes, spec.threads)
        canary(self.engine)
        self.info = describe(tokenizers)

    def execute(self, requests):
        jobs, info_requests = [], set()
        for i, request in enumerate(requests):
            arrays = {name: _from_triton(pb_utils.get_input_tensor_by_name(request, name)) for name in INPUTS}
            if unpack_json(arrays["META"]).get("op") == "info":
                info_requests.add(i)
                continue
            jobs.append(inputs_to_job(i, arrays))
        results = {r.id: r for r in self.engine.run(jobs)} if jobs else {}
        responses = []
        for i in range(len(requests)):
            if i in info_requests:  # the front end asks which model this is
                outputs = result_to_outputs(JobResult(i))
                outputs["ERROR"] = pack_json({"info": self.info})
            else:
                outputs = result_to_outputs(results[i])
            responses.append(pb_utils.InferenceResponse([_to_triton(name, v) for name, v in outputs.items()]))
        return responses


# Tensors cross the backend boundary through DLPack: the stub's NumPy bridge was compiled for
# NumPy 1.x and misreads NumPy 2 arrays, DLPack has no such dependency.
def _from_triton(tensor) -> np.ndarray:
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).numpy()


def _to_triton(name: str, value: np.ndarray):
    if value.size == 0:  # no data to misread; DLPack refuses the strides of empty tensors
        return pb_utils.Tensor(name, value)
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(value))))

