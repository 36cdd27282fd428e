"""Run the front end's batches on a Triton Inference Server instead of the in-process worker.

Same Backend interface, same jobs and results (service/triton_io.py does the conversion), so
the API, the errors and the outputs do not change. A batch travels as one Triton request (or
one per input width, sent concurrently), and the scheduler keeps several batches in flight
(`max_inflight_batches`) instead of waiting for each, so Triton's dynamic batcher always has
requests queued to join into its next pass, from this front end and from others. On the same
host the inputs go through shared memory instead of the socket (service/triton_shm.py).
"""

from __future__ import annotations

import ipaddress
import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from .triton_io import OUTPUTS, info_inputs, outputs_to_results, pack_requests, unpack_json
from .triton_shm import RegionPool, region_bytes
from .worker.backends import WorkerDied
from .worker.jobs import Job, JobResult

log = logging.getLogger("atoken.triton")
MODEL = "atoken"
# An answer from the server is news that it lives: for this long after one, `alive` asks no
# more. The dispatcher asks before every batch; a ping each time took the model's cores from
# it at concurrency 1 (the ping ran beside the pass) and added a round trip per batch.
ANSWER_PROVES_LIVE_S = 1.0
# How long past the longest deadline a batch's answer may take before the server counts as
# gone: a pass can run as long as a job's deadline allows, and its answer still has to travel.
ANSWER_MARGIN_S = 60.0
DTYPES = {np.dtype(np.float32): "FP32", np.dtype(np.int32): "INT32", np.dtype(np.int64): "INT64",
          np.dtype(np.uint8): "UINT8"}


class TritonBackend:
    def __init__(self, url: str | None, protocol: str = "http", model: str = MODEL, concurrency: int = 8,
                 max_inflight_batches: int = 8, batches_ahead: int = 1, replicas: int = 1,
                 shared_memory: str = "auto", answer_timeout_s: float = 3660.0):
        if not url:
            raise ValueError("ATOKEN_TRITON_URL is required when ATOKEN_WORKER=triton")
        self.url, self.protocol, self.model = url, protocol, model
        self.concurrency = concurrency  # extra requests of one batch on the wire at once
        self.max_inflight_batches = max_inflight_batches
        # Batches kept waiting at each server (`replicas` behind the URL) behind those its lanes
        # run; past them a small batch waits for a full one or a return
        # (Scheduler._hold_small_batch): `hold_after`, set at start from the server's lanes.
        self.batches_ahead, self.replicas = batches_ahead, replicas
        self.hold_after: int | None = None
        if shared_memory not in ("auto", "on", "off"):
            raise ValueError(f"shared_memory must be auto, on or off, not {shared_memory!r}")
        self.shared_memory = shared_memory
        # tritonclient's HTTP client gives up on an answer after 60 s by default, and a failed
        # request counts as a dead server (restarted, 503), so a legitimate pass of over a
        # minute (a 3D asset on a CPU, a job) failed; gRPC waits for ever by default.
        self.answer_timeout_s = answer_timeout_s
        self.regions: RegionPool | None = None
        self.info: dict = {}
        self.pool = ThreadPoolExecutor(concurrency, thread_name_prefix="atoken-triton")
        if protocol == "grpc":
            import tritonclient.grpc as client
        else:
            import tritonclient.http as client
        self._client_mod = client
        self._local = threading.local()  # the HTTP client is gevent-based: one per thread
        self._last_answer = -ANSWER_PROVES_LIVE_S  # monotonic time of the server's last answer

    @property
    def client(self):
        if not hasattr(self._local, "client"):
            timeouts = {} if self.protocol == "grpc" else {"network_timeout": self.answer_timeout_s}
            self._local.client = self._client_mod.InferenceServerClient(url=self.url, **timeouts)
        return self._local.client

    def start(self) -> dict:
        if not self.client.is_server_ready() or not self.client.is_model_ready(self.model):
            raise WorkerDied(f"Triton at {self.url} has no ready model {self.model!r}")
        self.regions = self._shared_memory()
        out = self._infer(info_inputs())
        self.info = unpack_json(out["ERROR"])["info"]
        inputs = "shared memory" if self.regions else "the wire"
        self.info["backend"] = f"triton ({self.protocol}://{self.url}, inputs through {inputs})"
        hold_after = self.replicas * (max(1, int(self.info.get("lanes", 1))) + self.batches_ahead)
        self.hold_after = hold_after if hold_after < self.max_inflight_batches else None
        return self.info

    def _shared_memory(self) -> RegionPool | None:
        """Regions for the inputs when the server can map them: `on` requires it, `auto` tries
        when the server's address is this host's loopback and falls back to the wire."""
        if self.shared_memory == "off" or (self.shared_memory == "auto" and not _loopback(self.url)):
            return None
        pool = RegionPool(lambda name, key, size: self.client.register_system_shared_memory(name, key, size),
                          lambda name: self.client.unregister_system_shared_memory(name))
        try:
            pool.give(pool.take(1))  # the server maps a first region now, or says it cannot
        except Exception as exc:  # noqa: BLE001 - another host, another /dev/shm, no permission
            pool.close()
            if self.shared_memory == "on":
                raise WorkerDied(f"Triton at {self.url} cannot map this process's shared memory: {exc}") from None
            log.info("Triton cannot map this process's shared memory (%s); inputs go on the wire", exc)
            return None
        freed = pool.reclaim_stale(self._registered_regions())
        if freed:
            log.warning("freed %d shared-memory regions that front ends which died had left at Triton", len(freed))
        return pool

    def _registered_regions(self) -> list[str]:
        """The names of the system shared-memory regions registered at the server."""
        if self.protocol == "grpc":
            return list(self.client.get_system_shared_memory_status(as_json=True).get("regions", {}))
        return [region["name"] for region in self.client.get_system_shared_memory_status()]

    def _infer(self, arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        c = self._client_mod
        shared = {name: a for name, a in arrays.items() if a.nbytes} if self.regions else {}
        region = None
        try:
            region = self.regions.take(region_bytes(shared)) if shared else None
            placed = region.write(shared) if region else {}
            inputs = []
            for name, value in arrays.items():
                tensor = c.InferInput(name, list(value.shape), DTYPES[value.dtype])
                if name in placed:
                    offset, nbytes = placed[name]
                    tensor.set_shared_memory(region.name, nbytes, offset)
                else:
                    tensor.set_data_from_numpy(value)
                inputs.append(tensor)
            # No outputs named: the server returns those the model made (only the ones with
            # rows, see results_to_outputs), all as binary.
            timeout = {"client_timeout": self.answer_timeout_s} if self.protocol == "grpc" else {}
            result = self.client.infer(self.model, inputs, **timeout)
        except Exception as exc:  # noqa: BLE001 - connection or server failure
            raise WorkerDied(f"Triton request failed: {exc}") from None
        finally:
            if region is not None:
                self.regions.give(region)  # the server has read it: the answer has come
        self._last_answer = time.monotonic()
        return {name: result.as_numpy(name) for name in OUTPUTS}

    def run(self, jobs: list[Job]) -> list[JobResult]:
        requests = pack_requests(jobs)
        if not requests:
            return []
        # The first request goes from this thread; any others (other input widths) beside it.
        futures = [self.pool.submit(self._infer, arrays) for _, arrays in requests[1:]]
        answers = [self._infer(requests[0][1])] + [f.result() for f in futures]
        results: list[JobResult | None] = [None] * len(jobs)
        for (positions, _), out in zip(requests, answers):
            for i, r in zip(positions, outputs_to_results([jobs[i] for i in positions], out)):
                results[i] = r
        return results

    def alive(self) -> bool:
        if time.monotonic() - self._last_answer < ANSWER_PROVES_LIVE_S:
            return True
        try:
            return bool(self.client.is_server_live())
        except Exception:  # noqa: BLE001
            return False

    def stop(self) -> None:
        self.pool.shutdown(wait=False)
        if self.regions is not None:
            self.regions.close()
            self.regions = None


def _loopback(url: str) -> bool:
    host = url.rsplit(":", 1)[0].strip("[]") if url.count(":") else url
    host = host.split("://")[-1]
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
