"""The peer in `make bench-peers`: LitServe serving the same model with the same pre- and
post-processing code as this service, so the comparison measures the serving layer alone.

    python benchmarks/peers/litserve_app.py --port 8010 --workers 1

LitServe's own recommended set-up: requests batched in its inference worker (max_batch_size
32, batch_timeout 10 ms), `fast_queue` (ZeroMQ) between its API server and workers, uvicorn
with uvloop/httptools. Uploads arrive as multipart `file` fields, as they do for us. The model
is read from the same ATOKEN_* settings as `python -m service serve` (same dtype, threads,
checkpoint), so both serve identical numbers; the bench checks that."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

import litserve as ls
from fastapi import Response

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from service.outputs import render_image  # noqa: E402
from service.inputs import Options  # noqa: E402
from service.pipeline import preprocess  # noqa: E402
from service.settings import Settings  # noqa: E402
from service.worker.backends import LocalBackend  # noqa: E402
from service.worker.jobs import Job  # noqa: E402

MAX_BATCH_SIZE = 32
BATCH_TIMEOUT_S = 0.010


class _ModelAPI(ls.LitAPI):
    op = "embed"

    def setup(self, device) -> None:
        settings = Settings()
        self.limits = settings.limits
        # The model as a user would wrap it: one forward pass per batch on torch's threads,
        # without this service's worker policy (lanes).
        self.backend = LocalBackend(replace(settings.model_spec, lanes=1))
        self.info = self.backend.start()

    def decode_request(self, request):
        return preprocess(request["file"].file.read(), Options(), self.limits)

    def predict(self, items: list):
        results = self.backend.run([Job(i, self.op, batch=item.batch) for i, item in enumerate(items)])
        return list(zip(items, results))


class EncodeAPI(_ModelAPI):
    op = "embed"

    def encode_response(self, output) -> dict:
        item, result = output
        emb = result.embedding.numpy().astype("float32")
        return {"model": {"variant": self.info.get("variant"), "sha256": self.info.get("sha256"),
                          "trained": self.info.get("trained")},
                "items": [{"index": 0, "modality": item.modality, "kind": item.kind, "dim": int(emb.shape[0]),
                           "embedding": emb.tolist()}]}


class ReconstructAPI(_ModelAPI):
    op = "reconstruct"

    def encode_response(self, output) -> Response:
        item, result = output
        png, score = render_image(item, result, "png")
        return Response(png, media_type="image/png", headers={"X-Round-Trip-PSNR": f"{score:.2f}"})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8010)
    parser.add_argument("--workers", type=int, default=1, help="inference worker processes")
    args = parser.parse_args()
    apis = [EncodeAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/encode"),
            ReconstructAPI(max_batch_size=MAX_BATCH_SIZE, batch_timeout=BATCH_TIMEOUT_S, api_path="/reconstruct")]
    server = ls.LitServer(apis, accelerator="cpu", devices=1, workers_per_device=args.workers, fast_queue=True,
                          timeout=300)
    server.run(host="127.0.0.1", port=args.port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
