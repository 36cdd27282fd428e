"""OpenAI-compatible embeddings: POST /v1/embeddings and GET /v1/models, so the clients built
for that protocol (the `openai` packages, LangChain, LlamaIndex, ...) can embed images.

Inputs are images as data URIs or bare base64 (URLs only when URL fetch is allowed). The same
limits, auth, batching and errors apply as on /encode; errors come in the OpenAI shape."""

from __future__ import annotations

import base64
import binascii
import time
from typing import Literal

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError

from model.errors import ATokenError

from ..deps import get_runtime, read_json
from ..errors import BadRequest, ModelNotFound, PayloadTooLarge, ServiceError, UnsupportedType, openai_error
from ..fetch import check_url, fetch
from ..arrays import finite_list
from ..media.errors import MediaError
from ..inputs import Options
from ..responses import FastJSONResponse
from ..runtime import Runtime, wait_disconnect
from ..worker.jobs import Job

router = APIRouter(prefix="/v1", tags=["openai"])
OWNER = "atoken-serve"
STARTED = int(time.time())


class EmbeddingsRequest(BaseModel):
    input: str | list[str]
    model: str
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: int | None = None
    user: str | None = None


def model_ids(runtime: Runtime) -> list[str]:
    """The served model's name, and `atoken` as an alias that always works."""
    variant = runtime.model_info.get("variant") or "atoken"
    return [variant] if variant == "atoken" else [variant, "atoken"]


def _decode_input(text: str, position: int, max_bytes: int) -> bytes:
    payload = text.split(",", 1)[1] if text.startswith("data:") and "," in text else text
    if len(payload) * 3 // 4 > max_bytes:
        raise PayloadTooLarge(f"input[{position}] decodes to more than {max_bytes} bytes", limit=max_bytes)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"input[{position}] must be an image as a data URI or base64 (text is not supported)") \
            from None


async def _uploads(body: EmbeddingsRequest, runtime: Runtime) -> list[bytes]:
    settings = runtime.settings
    inputs = [body.input] if isinstance(body.input, str) else body.input
    if not inputs:
        raise BadRequest("input must not be empty")
    if len(inputs) > settings.max_files:  # counted before anything is decoded or downloaded
        raise PayloadTooLarge(f"{len(inputs)} inputs, over the limit of {settings.max_files} per request",
                              limit=settings.max_files)
    uploads = []
    for i, text in enumerate(inputs):
        if text.startswith(("http://", "https://")):
            url = check_url(text, settings.allow_url_fetch, settings.allowlist)
            uploads.append(await fetch(url, settings.max_upload_bytes, settings.fetch_timeout_s))
        else:
            uploads.append(_decode_input(text, i, settings.max_upload_bytes))
    return uploads


def _parse(doc: object) -> EmbeddingsRequest:
    try:
        return EmbeddingsRequest.model_validate(doc)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem.get("loc", ())) or "body"
        raise BadRequest(f"{where}: {problem.get('msg')}") from None


@router.post("/embeddings", summary="OpenAI-compatible embeddings of images")
async def embeddings(request: Request, runtime: Runtime = Depends(get_runtime)):
    try:
        body = _parse(await read_json(request, runtime))
        if body.model not in model_ids(runtime):
            raise ModelNotFound(f"model {body.model!r} is not served here; GET /v1/models lists {model_ids(runtime)}")
        dim = int(runtime.model_info.get("embed_dim") or 0)
        if body.dimensions is not None and body.dimensions != dim:
            raise BadRequest(f"dimensions={body.dimensions} is not supported: this model's embeddings have "
                             f"{dim} dimensions (omit the field)", limit=dim)
        items = await runtime.preprocess_all(await _uploads(body, runtime), Options())
        request.state.modality = ",".join(sorted({i.modality for i in items}))
        if any(i.streamed for i in items):
            raise UnsupportedType("input must be images (POST /encode embeds videos and 3D assets)")
        jobs = [Job(runtime.scheduler.next_id(), "embed", batch=i.batch) for i in items]
        results, timing = await runtime.infer(lambda: wait_disconnect(request), jobs)
    except (ServiceError, MediaError, ATokenError) as exc:
        status, content, headers = openai_error(exc)
        return JSONResponse(content, status_code=status, headers=headers)
    data = []
    for i, r in enumerate(results):
        vector = r.embedding.numpy().astype("<f4")
        embedding = (base64.b64encode(vector.tobytes()).decode() if body.encoding_format == "base64"
                     else finite_list(vector, "the embedding"))
        data.append({"object": "embedding", "index": i, "embedding": embedding})
    tokens = sum(int(i.batch.coords.shape[0]) for i in items)
    return FastJSONResponse({"object": "list", "data": data, "model": body.model,
                         "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}, headers=timing.headers())


@router.get("/models", summary="OpenAI-compatible list of the served models")
def models(runtime: Runtime = Depends(get_runtime)):
    return {"object": "list", "data": [{"id": name, "object": "model", "created": STARTED, "owned_by": OWNER}
                                       for name in model_ids(runtime)]}
