"""Triton Python backend: the AToken model behind Triton's dynamic batcher.

Each request holds a group of jobs (see service/triton_io.py). Triton hands `execute` every
request its dynamic batcher joined; all their jobs run through the same Engine the in-process
worker uses, in passes of at most ATOKEN_MAX_BATCH_TOKENS token passes (joined requests from
many front ends cannot make one pass bigger than a front end's own batch). The model comes
from the ATOKEN_* environment (checkpoint, config, dtype, device), exactly as for the HTTP
service. On a CPU each batch runs on a lane of its own, side by side with the next, answered
after `execute` returns (Triton 24.07 or later: docker/Dockerfile.triton uses 25.01).
"""

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace

# The backend stub's embedded interpreter ignores PYTHONPATH; a virtual environment outside
# the image's own site-packages is named here instead (service/triton_launch.py sets it).
sys.path[:0] = [p for p in os.environ.get("ATOKEN_PYTHONPATH", "").split(os.pathsep) if p and p not in sys.path]

# OpenMP threads spin briefly between operations, then sleep, as in the process worker
# (service/worker/backends.py, docs/performance.md); libgomp reads this when torch loads.
os.environ.setdefault("GOMP_SPINCOUNT", "20000")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.utils.dlpack  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402

from service.settings import Settings  # noqa: E402
from service.triton_io import INPUTS, info_outputs, inputs_to_jobs, results_to_outputs, unpack_json  # noqa: E402
from service.worker.backends import ready_info  # noqa: E402
from service.worker.engine import Engine, LaneQueue, Lanes, chunks_by_cost  # noqa: E402
from service.worker.loader import load_tokenizers  # noqa: E402


class TritonPythonModel:
    def initialize(self, args):
        settings = Settings()
        spec = settings.model_spec
        if not spec.threads and spec.device == "cpu":
            # The backend stub starts OpenMP with one thread (omp_get_max_threads() is 1 there,
            # with two CPUs allowed), so torch's default left one lane on one core: every core
            # this process may use instead, as the process worker gets from torch's default.
            spec = replace(spec, threads=len(os.sched_getaffinity(0)))  # Triton runs on Linux only
        tokenizers = load_tokenizers(spec)
        self.engine = Engine(tokenizers, spec.engine_lanes, spec.threads)
        self.max_batch_tokens = settings.max_batch_tokens
        self.info = ready_info(self.engine, tokenizers)
        # Answers are packed and handed to the server on their own thread, so the next pass
        # starts at once instead of after them (a response sender waits for the server's
        # reply, 0.6 ms an answer, while the lane would sit idle). The last pass run inside
        # `execute` answers in its return value instead (see `execute`).
        self.responder = ThreadPoolExecutor(1, thread_name_prefix="atoken-respond")
        self._next_id = 0
        # One batch per lane, side by side, as in the process worker (docs/performance.md):
        # `execute` queues its requests and returns; a lane that frees takes what is queued
        # then, so requests that come while both lanes compute join one pass (a batch formed
        # when `execute` ran, before a lane was free, made passes half the process worker's).
        # Requests are answered from the lane. Up to a full pass per lane waits here; more
        # waits in Triton's queue (`execute` blocks).
        lanes = spec.engine_lanes if settings.lane_batches else 1
        self.lanes = Lanes(self.engine, lanes) if lanes > 1 else None
        self.info["lanes"] = lanes
        self.queue = LaneQueue(self.lanes, lambda pending: self._run(pending, self.lanes.run), self.max_batch_tokens,
                               lanes * self.max_batch_tokens) if self.lanes else None

    def execute(self, requests):
        """Runs the joined requests in passes of at most max_batch_tokens and answers each
        request as soon as its own jobs are done, so the front ends can encode the first
        answers while later passes run. With lanes, requests that do not run here on every
        thread are queued for the lanes, and `execute` returns; they are answered from there.

        What is answered before `execute` returns goes back in its return value: the backend
        then hands the answers over with `execute`'s own reply, where a response sender waits
        for a round trip to the server per answer (0.6 ms at concurrency 1, while the model's
        cores sat idle)."""
        returned = [None] * len(requests)
        pending, jobs = self._read(requests, returned)
        if jobs and (self.lanes is None or (len(jobs) == 1 and self.lanes.idle() and self.queue.empty())):
            self._run([(_Reply(sender, returned, i), own) for i, sender, own in pending], self.engine.run, inline=True)
        elif jobs:
            self.queue.put([(_Reply(sender), own) for _, sender, own in pending],
                           [sum(j.cost for j in own) for _, _, own in pending])
        return returned if any(r is not None for r in returned) else None

    def _read(self, requests, returned: list) -> tuple[list, list]:
        """-> [(request's index, its response sender, its jobs)], all the jobs; a request for
        the model's info is answered at once, into `returned`."""
        # Job ids count on across `execute` calls: a lane's pass may join requests of several.
        pending, jobs, next_id = [], [], self._next_id
        for i, request in enumerate(requests):
            sender = request.get_response_sender()
            arrays = {name: _from_triton(pb_utils.get_input_tensor_by_name(request, name)) for name in INPUTS}
            if self.lanes is not None:  # a lane may read them after `execute` returns, when Triton has freed its own
                arrays = {name: a.copy() for name, a in arrays.items()}
            meta = unpack_json(arrays["META"])
            if meta.get("info"):  # the front end asks which model this is
                returned[i] = _response(info_outputs(self.info))
                continue
            own = inputs_to_jobs(next_id, meta["jobs"], arrays)
            next_id += len(own)
            pending.append((i, sender, own))
            jobs += own
        self._next_id = next_id
        return pending, jobs

    def _run(self, pending: list, run, inline: bool = False) -> None:
        """The requests' jobs in passes of `run`; every request gets its one answer, whatever
        happens. pending: [(_Reply, jobs)]. Answers go out on the responder thread while later
        passes run (a lane goes on to its next pass at once); `inline`, on `execute`'s thread,
        the last pass's answers go into its return value."""
        results, answering = {}, []
        try:
            chunks = chunks_by_cost([j for _, own in pending for j in own], self.max_batch_tokens)
            for k, chunk in enumerate(chunks):
                results.update((r.id, r) for r in run(chunk))
                last = k == len(chunks) - 1
                while pending and all(j.id in results for j in pending[0][1]):
                    reply, own = pending.pop(0)
                    answer = [results.pop(j.id) for j in own]
                    if last and inline:
                        _answer(reply.final, answer)
                    else:
                        answering.append(self.responder.submit(_answer, reply.early, answer))
        except Exception as exc:  # noqa: BLE001 - every request still gets its one answer
            for reply, _ in pending:
                reply.final(_error(exc))
        if inline:  # the senders' answers go before `execute` returns
            for done in answering:
                done.result()

    def finalize(self):
        if self.lanes is not None:
            self.queue.close()
            self.lanes.close()
        self.responder.shutdown(wait=True)


class _Reply:
    """How a request is answered: through its response sender, or, when `execute` returns
    after its last pass, in `execute`'s return value (`returned`, at the request's place)."""

    def __init__(self, sender, returned: list | None = None, index: int = 0):
        self.sender, self.returned, self.index = sender, returned, index

    def early(self, response) -> None:
        self.sender.send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)

    def final(self, response) -> None:
        if self.returned is None:
            self.early(response)
        else:
            self.returned[self.index] = response


def _answer(send, results) -> None:
    try:
        send(_response(results_to_outputs(results)))
    except Exception as exc:  # noqa: BLE001 - the request still gets its one answer (send is the last step)
        send(_error(exc))


def _error(exc: Exception):
    return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"{type(exc).__name__}: {exc}"))


def _response(outputs: dict):
    return pb_utils.InferenceResponse([_to_triton(name, v) for name, v in outputs.items()])


# Tensors cross the backend boundary through DLPack: the stub's NumPy bridge was compiled for
# NumPy 1.x and misreads NumPy 2 arrays, DLPack has no such dependency.
def _from_triton(tensor) -> np.ndarray:
    return torch.utils.dlpack.from_dlpack(tensor.to_dlpack()).numpy()


def _to_triton(name: str, value: np.ndarray):
    if value.size == 0:  # no data to misread; DLPack refuses the strides of empty tensors
        return pb_utils.Tensor(name, value)
    return pb_utils.Tensor.from_dlpack(name, torch.utils.dlpack.to_dlpack(torch.from_numpy(np.ascontiguousarray(value))))
