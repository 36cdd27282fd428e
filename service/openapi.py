"""The API document, honest about what each route takes and answers: its query parameters,
request bodies, every response media type with a schema, and every status it can return
(from the one error table). Routes stay thin; what they accept is described here once."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

from .arrays import DTYPES, NPY, SAFETENSORS
from .outputs import MEDIA_TYPES

BINARY = {"type": "string", "format": "binary"}
ARRAY = {"type": "object", "required": ["dtype", "shape", "data"], "properties": {
    "dtype": {"type": "string", "enum": sorted(DTYPES)},
    "shape": {"type": "array", "maxItems": 4, "items": {"type": "integer", "minimum": 0}},
    "data": {"oneOf": [{"type": "string"}, {"type": "array"}]}}}
MODEL_REF = {"type": "object", "properties": {
    "variant": {"type": ["string", "null"]}, "sha256": {"type": ["string", "null"]},
    "trained": {"type": ["boolean", "null"]}}}
ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "limit": {}}}}}

ERROR_TEXT = {
    400: "Malformed request (body, JSON, arrays)",
    401: "Missing or wrong API key",
    404: "Unknown model (OpenAI routes) or job (another key's jobs read as unknown)",
    405: "Method not allowed (see the Allow header)",
    406: "The requested representation cannot hold the answer",
    408: "The request body did not arrive in time",
    409: "The job has not finished yet; retry after Retry-After seconds",
    410: "The job's result expired or the job was cancelled",
    413: "Over a size limit (bytes, files, pixels, frames, tokens, inflated bytes); `limit` names it",
    415: "Unsupported media type",
    422: "Invalid content or parameters; `limit` names the limit when one applies",
    429: "Overloaded now; retry after Retry-After seconds",
    499: "The client closed the connection (logged, never seen by the client)",
    500: "A bug: the connection stays usable and the response is counted",
    503: "The model worker is starting or restarting",
    504: "The request's deadline passed",
    507: "The jobs storage is full; finished results expire or can be deleted",
}
INFERENCE_ERRORS = (400, 401, 405, 406, 408, 413, 415, 422, 429, 500, 503, 504)

BOOL = {"type": "boolean"}
PARAMETERS = {
    "tokens": ({"type": "string", "enum": ["continuous", "discrete"], "default": "continuous"},
               "continuous latents, or FSQ indices (discrete models)"),
    "format": ({"type": "string", "enum": ["png", "jpeg", "jpg", "webp", "mp4", "webm", "ply", "npz"]},
               "output format; the default follows the kind"),
    "fps": ({"type": "number", "exclusiveMinimum": 0, "maximum": 1000}, "video: sample at this rate"),
    "max_frames": ({"type": "integer", "minimum": 1}, "video: at most this many frames"),
    "start": ({"type": "number", "minimum": 0}, "video: first second"),
    "end": ({"type": "number", "minimum": 0}, "video: end second, not included (after start)"),
    "background": ({"type": "string", "pattern": "^#?([0-9A-Fa-f]{6}|\\d{1,3},\\d{1,3},\\d{1,3})$"},
                   "images: colour alpha is composited on, RRGGBB or r,g,b"),
    "array_format": ({"type": "string", "enum": ["base64", "list"]}, "token and feature arrays in JSON"),
    "dense": (BOOL, "also return per-token features"),
    "preview": ({"type": "string", "enum": ["none", "grid", "turntable"]}, "3D: a preview beside the PLY"),
    "score": (BOOL, "3D: render PSNR/SSIM headers"),
}
ROUTE_PARAMETERS = {
    "/encode": ("fps", "max_frames", "start", "end", "background", "array_format", "dense"),
    "/tokenize": ("tokens", "fps", "max_frames", "start", "end", "background", "array_format"),
    "/reconstruct": ("tokens", "format", "fps", "max_frames", "start", "end", "background", "preview", "score"),
    "/decode": ("format",),
}

ENCODE_JSON = {"type": "object", "required": ["model", "items"], "properties": {
    "model": MODEL_REF, "items": {"type": "array", "items": {
        "type": "object", "required": ["index", "modality", "kind", "dim", "embedding"], "properties": {
            "index": {"type": "integer"}, "modality": {"type": "string"}, "kind": {"type": "string"},
            "dim": {"type": "integer"}, "embedding": {"type": "array", "items": {"type": "number"}},
            "features": ARRAY, "coords": ARRAY}}}}}
TOKEN_ITEM = {"type": "object", "required": ["index", "modality", "kind", "media", "num_tokens", "coords"],
              "properties": {"index": {"type": "integer"}, "modality": {"type": "string"},
                             "kind": {"type": "string", "enum": ["image", "video", "3D"]},
                             "media": {"type": "object"}, "num_tokens": {"type": "integer"},
                             "coords": ARRAY, "latents": ARRAY, "indices": ARRAY}}
TOKENIZE_JSON = {"type": "object", "required": ["model", "mode", "items"], "properties": {
    "model": MODEL_REF, "mode": {"type": "string", "enum": ["continuous", "discrete"]},
    "items": {"type": "array", "items": TOKEN_ITEM}}}
MEDIA_OUT = {t: {"schema": BINARY} for t in sorted(set(MEDIA_TYPES.values()) | {"application/zip"})}
SUCCESS = {
    "/encode": {"application/json": {"schema": ENCODE_JSON}, NPY: {"schema": BINARY},
                SAFETENSORS: {"schema": BINARY}},
    "/tokenize": {"application/json": {"schema": TOKENIZE_JSON}, NPY: {"schema": BINARY},
                  SAFETENSORS: {"schema": BINARY}},
    "/reconstruct": MEDIA_OUT,
    "/decode": MEDIA_OUT,
}
TIMING_HEADERS = {name: {"schema": {"type": "string"}} for name in
                  ("X-Queue-Time-Ms", "X-Compute-Time-Ms", "X-Batch-Size")}
MEDIA_HEADERS = {**TIMING_HEADERS, **{name: {"description": text, "schema": {"type": "string"}} for name, text in (
    ("X-Tokens", "tokens per item, comma-separated"),
    ("X-Token-Grid", "token grid per item: frames x rows x columns (3D: voxel extent x x y x z)"),
    ("X-Round-Trip-PSNR", "/reconstruct: dB against the input, per item (empty for 3D)"))}}
UPLOAD_BODY = {"required": True, "content": {
    "multipart/form-data": {"schema": {"type": "object", "required": ["file"], "properties": {
        "file": {"type": "array", "minItems": 1, "items": BINARY}}}},
    "application/octet-stream": {"schema": BINARY},
    "application/json": {"schema": {"type": "object", "required": ["urls"], "properties": {
        "urls": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}},
}}
DECODE_BODY = {"required": True, "content": {
    "application/json": {"schema": {"type": "object", "required": ["items"], "properties": {
        "items": {"type": "array", "minItems": 1, "items": TOKEN_ITEM}}}},  # at most max_files
    SAFETENSORS: {"schema": BINARY}}}

JOB_JSON = {"type": "object", "required": ["id", "op", "status", "progress", "links"], "properties": {
    "id": {"type": "string"}, "op": {"type": "string", "enum": ["encode", "tokenize", "reconstruct"]},
    "status": {"type": "string", "enum": ["queued", "running", "succeeded", "failed", "cancelled", "cancelling"]},
    "progress": {"type": "object", "required": ["done", "total", "unit"], "properties": {
        "done": {"type": "integer"}, "total": {"type": "integer"}, "unit": {"type": "string"}}},
    "eta_s": {"type": ["number", "null"]}, "created": {"type": "string"},
    "started": {"type": ["string", "null"]}, "finished": {"type": ["string", "null"]},
    "expires": {"type": "string"}, "expired": {"type": "boolean"},
    "error": {"type": ["object", "null"]},
    "links": {"type": "object", "properties": {"self": {"type": "string"}, "result": {"type": "string"}}}}}
JOB_OK = {"description": "The job", "content": {"application/json": {"schema": JOB_JSON}}}
ANY_RESULT = {**{k: v for path in ("/encode", "/tokenize", "/reconstruct") for k, v in SUCCESS[path].items()},
              "application/json": {"schema": {"oneOf": [ENCODE_JSON, TOKENIZE_JSON]}}}
JOB_OPTIONS = tuple(dict.fromkeys(n for path in ("/encode", "/tokenize", "/reconstruct")
                                  for n in ROUTE_PARAMETERS[path]))

OPERATIONS_GET = {
    "/healthz": ({"application/json": {"schema": {"type": "object", "properties": {
        "status": {"type": "string"}, "worker_alive": {"type": "boolean"}, "restarts": {"type": "integer"},
        "last_error": {"type": ["string", "null"]}}}}}, (503,)),
    "/readyz": ({"application/json": {"schema": {"type": "object", "properties": {
        "status": {"type": "string"}, "model": {"type": ["string", "null"]}}}}}, (503,)),
    "/metrics": ({"text/plain": {"schema": {"type": "string"}}}, ()),
    "/info": ({"application/json": {"schema": {"type": "object", "required": ["model", "limits"]}}}, (401,)),
}


OPENAI_ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["message", "type", "code"],
    "properties": {"message": {"type": "string"}, "type": {"type": "string"}, "param": {"type": ["string", "null"]},
                   "code": {"type": ["string", "null"]}}}}}
EMBEDDINGS_BODY = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["input", "model"], "properties": {
        "input": {"oneOf": [{"type": "string"}, {"type": "array", "minItems": 1, "items": {"type": "string"}}],
                  "description": "images as data URIs or base64; URLs when URL fetch is allowed"},
        "model": {"type": "string", "description": "an id from GET /v1/models"},
        "encoding_format": {"type": "string", "enum": ["float", "base64"], "default": "float"},
        "dimensions": {"type": "integer", "description": "must equal the model's embedding size"},
        "user": {"type": "string"}}}}}}
EMBEDDINGS_JSON = {"type": "object", "required": ["object", "data", "model", "usage"], "properties": {
    "object": {"type": "string", "enum": ["list"]}, "model": {"type": "string"},
    "data": {"type": "array", "items": {"type": "object", "required": ["object", "index", "embedding"], "properties": {
        "object": {"type": "string", "enum": ["embedding"]}, "index": {"type": "integer"},
        "embedding": {"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "string"}]}}}},
    "usage": {"type": "object", "required": ["prompt_tokens", "total_tokens"], "properties": {
        "prompt_tokens": {"type": "integer"}, "total_tokens": {"type": "integer"}}}}}
MODELS_JSON = {"type": "object", "required": ["object", "data"], "properties": {
    "object": {"type": "string"}, "data": {"type": "array", "items": {"type": "object", "required": ["id", "object"],
                                                                     "properties": {"id": {"type": "string"}}}}}}


def _errors(statuses, schema: str = "Error") -> dict[str, Any]:
    out = {}
    for status in statuses:
        entry: dict[str, Any] = {"description": ERROR_TEXT.get(status, "Not found"),
                                 "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}}}
        if status == 429:
            entry["headers"] = {"Retry-After": {"schema": {"type": "string"}}}
        if status == 401:
            entry["headers"] = {"WWW-Authenticate": {"schema": {"type": "string"}}}
        if status == 405:
            entry["headers"] = {"Allow": {"schema": {"type": "string"}}}
        out[str(status)] = entry
    return out


def _parameters(path: str) -> list[dict]:
    return [{"name": name, "in": "query", "required": False, "schema": PARAMETERS[name][0],
             "description": PARAMETERS[name][1]} for name in ROUTE_PARAMETERS[path]]


def _document_jobs(path: str, methods: dict) -> None:
    security = [{}, {"bearer": []}, {"apiKey": []}]
    if path == "/jobs/{ref}":
        op = methods["post"]
        op["parameters"] = [{"name": "ref", "in": "path", "required": True, "description": "the operation",
                             "schema": {"type": "string", "enum": ["encode", "tokenize", "reconstruct"]}}] + [
            {"name": n, "in": "query", "required": False, "schema": PARAMETERS[n][0], "description": PARAMETERS[n][1]}
            for n in JOB_OPTIONS]
        op["requestBody"] = UPLOAD_BODY
        op["responses"] = {"202": {**JOB_OK, "description": "Accepted; Location names the job",
                                   "headers": {"Location": {"schema": {"type": "string"}}}},
                           **_errors(INFERENCE_ERRORS + (507,))}
        for name in ("get", "delete"):
            methods[name]["parameters"] = [{"name": "ref", "in": "path", "required": True, "description": "a job id",
                                            "schema": {"type": "string"}}]
        methods["get"]["responses"] = {"200": JOB_OK, **_errors((401, 404, 405, 500))}
        methods["delete"]["responses"] = {"200": JOB_OK, "202": {**JOB_OK, "description": "Cancelling"},
                                          "204": {"description": "Deleted"}, **_errors((401, 404, 405, 500))}
    elif path == "/jobs/{ref}/result":
        op = methods["get"]
        op["responses"] = {"200": {"description": "Exactly the synchronous route's answer", "content": ANY_RESULT},
                           **_errors(INFERENCE_ERRORS + (404, 409, 410))}
    for op in methods.values():
        op["security"] = security


def document(app: FastAPI) -> dict:
    if app.openapi_schema:
        return app.openapi_schema
    spec = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
    spec.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR
    spec["components"]["schemas"]["OpenAIError"] = OPENAI_ERROR
    spec["components"]["securitySchemes"] = {
        "bearer": {"type": "http", "scheme": "bearer"},
        "apiKey": {"type": "apiKey", "in": "header", "name": "X-API-Key"}}
    for path, methods in spec["paths"].items():
        if path in SUCCESS:
            op = methods["post"]
            op["parameters"] = _parameters(path)
            op["requestBody"] = DECODE_BODY if path == "/decode" else UPLOAD_BODY
            media_out = path in ("/reconstruct", "/decode")
            op["responses"] = {"200": {"description": "OK", "content": SUCCESS[path],
                                       "headers": MEDIA_HEADERS if media_out else TIMING_HEADERS},
                               **_errors(INFERENCE_ERRORS)}
            op["security"] = [{}, {"bearer": []}, {"apiKey": []}]
        elif path == "/v1/embeddings":
            op = methods["post"]
            op["requestBody"] = EMBEDDINGS_BODY
            op["responses"] = {"200": {"description": "OK", "content": {"application/json": {"schema": EMBEDDINGS_JSON}},
                                       "headers": TIMING_HEADERS},
                               **_errors(INFERENCE_ERRORS + (404,), "OpenAIError")}
            op["security"] = [{}, {"bearer": []}, {"apiKey": []}]
        elif path == "/v1/models":
            op = methods["get"]
            op["responses"] = {"200": {"description": "OK", "content": {"application/json": {"schema": MODELS_JSON}}},
                               **_errors((401, 405, 500), "OpenAIError")}
            methods["head"] = {"summary": op.get("summary", "") + " (headers only)", "operationId": "head_v1_models",
                               "responses": {code: {"description": r["description"]}
                                             for code, r in op["responses"].items()}}
        elif path.startswith("/jobs/"):
            _document_jobs(path, methods)
        elif path in OPERATIONS_GET:
            content, extra = OPERATIONS_GET[path]
            op = methods["get"]
            op["responses"] = {"200": {"description": "OK", "content": content}, **_errors((405, 500) + extra)}
            head = {"summary": op.get("summary", "") + " (headers only)", "operationId": f"head_{path.strip('/')}",
                    "responses": {code: {"description": r["description"]} for code, r in op["responses"].items()}}
            methods["head"] = head
    app.openapi_schema = spec
    return spec
