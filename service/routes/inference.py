"""POST /encode, /tokenize, /decode, /reconstruct. Thin: parse, run the operation (service.ops),
send its answer."""

from __future__ import annotations

import os

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, Response
from starlette.background import BackgroundTask

from .. import ops
from ..arrays import from_safetensors
from ..deps import get_runtime, is_safetensors, parse_options, read_body, read_json, read_uploads
from ..errors import BadRequest, PayloadTooLarge
from ..pipeline import tokens_from_json
from ..responses import FastJSONResponse
from ..runtime import Runtime, wait_disconnect
from ..uploads import release

router = APIRouter(tags=["inference"])


async def _answer(request: Request, runtime: Runtime, operation) -> Response:
    """Uploads -> items -> `operation(items, options, raw)`; large uploads kept on disk are
    deleted once the operation is done (its answer is a separate file or bytes)."""
    uploads, fields = await read_uploads(request, runtime)
    try:
        options, raw = parse_options(request, fields)
        items = await runtime.preprocess_all(uploads, options)
        request.state.modality = ",".join(sorted({i.modality for i in items}))
        return send(await operation(items, options, raw))
    finally:
        release(uploads)


def _call(request: Request) -> ops.Call:
    return ops.Call(request.headers.get("accept", ""), lambda: wait_disconnect(request))


def send(answer: ops.Answer) -> Response:
    """An operation's answer as a response; a temporary file is streamed, then deleted."""
    if answer.path is not None:
        return FileResponse(answer.path, media_type=answer.media_type, headers=answer.headers,
                            background=BackgroundTask(os.unlink, answer.path))
    if answer.json is not None:
        return FastJSONResponse(answer.json, headers=answer.headers)
    return Response(answer.body, media_type=answer.media_type, headers=answer.headers)


@router.post("/encode", summary="Global L2-normalised embedding per item")
async def encode(request: Request, runtime: Runtime = Depends(get_runtime)):
    return await _answer(request, runtime, lambda items, options, raw: ops.encode(runtime, items, options, raw,
                                                                                    _call(request)))


@router.post("/tokenize", summary="Continuous latents or discrete FSQ indices with 4D coords")
async def tokenize(request: Request, runtime: Runtime = Depends(get_runtime)):
    return await _answer(request, runtime, lambda items, options, _: ops.tokenize(runtime, items, options,
                                                                                  _call(request)))


@router.post("/reconstruct", summary="Media in, its reconstruction out (PNG / MP4 / PLY)")
async def reconstruct(request: Request, runtime: Runtime = Depends(get_runtime)):
    return await _answer(request, runtime, lambda items, options, _: ops.reconstruct(runtime, items, options,
                                                                                     _call(request)))


@router.post("/decode", summary="Tokens (as /tokenize returned them) back to media")
async def decode(request: Request, runtime: Runtime = Depends(get_runtime)):
    options, _ = parse_options(request, {})
    # The body and its parsed form are dropped once the tokens are read: a long video's token
    # set is decoded tile by tile for seconds, holding only its arrays.
    decoded = _decoded(await _token_entries(request, runtime), runtime)
    request.state.modality = ",".join(sorted({k for _, k, _ in decoded}))
    return send(await ops.decode(runtime, decoded, options, _call(request)))


async def _token_entries(request: Request, runtime: Runtime) -> list[dict]:
    if is_safetensors(request):
        return _entries_from_safetensors(await read_body(request))
    doc = await read_json(request, runtime)
    if not isinstance(doc, dict) or not isinstance(doc.get("items"), list) or not doc["items"]:
        raise BadRequest("expected the JSON /tokenize returned: an object with a non-empty 'items' list")
    return doc["items"]


def _decoded(entries: list[dict], runtime: Runtime) -> list[tuple]:
    if len(entries) > runtime.settings.max_files:
        raise PayloadTooLarge(f"{len(entries)} items, over the limit of {runtime.settings.max_files}",
                              limit=runtime.settings.max_files)
    limits, model = runtime.settings.limits, runtime.model_info
    return [tokens_from_json(e, i, limits, model) for i, e in enumerate(entries)]


def _entries_from_safetensors(data: bytes) -> list[dict]:
    arrays, meta = from_safetensors(data)
    items = meta.get("items")
    if not isinstance(items, list) or not items:
        raise BadRequest("safetensors metadata has no 'items' (send what /tokenize returned)")
    entries = []
    for i, entry in enumerate(items):
        entry = dict(entry)
        for name in ("coords", "latents", "indices"):
            key = f"item{i}.{name}"
            if key in arrays:
                entry[name] = arrays[key]
        entries.append(entry)
    return entries
