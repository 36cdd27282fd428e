"""Request-level dependencies in one place: the runtime, uploads and options. (API keys and
admission are decided from headers by the gate, before the body is read.)"""

from __future__ import annotations

import math
from typing import Any

from fastapi import Request
from starlette.datastructures import UploadFile

from .arrays import SAFETENSORS
from .budget import MAX_FPS, parse_json
from .errors import BadRequest, InvalidParameter, PayloadTooLarge
from .fetch import check_url, fetch
from .inputs import Options
from .uploads import SPILL_BYTES, release, spill, spill_stream
from .runtime import Runtime

OUTPUT_FORMATS = {"png", "jpeg", "jpg", "webp", "mp4", "webm", "ply", "npz"}
OPTION_NAMES = ("tokens", "format", "fps", "max_frames", "start", "end", "background", "array_format", "dense",
                "preview", "score")


async def get_runtime(request: Request) -> Runtime:
    # async: FastAPI runs a plain `def` dependency in its thread pool, a thread hop per request
    return request.app.state.runtime


async def read_uploads(request: Request, runtime: Runtime) -> tuple[list[bytes], dict[str, str]]:
    """Media bytes from multipart `file` fields, JSON `urls`, or the raw body; plus form options."""
    uploads: list = []
    try:
        return await _read_uploads(request, runtime, uploads)
    except BaseException:
        release(uploads)  # files spilled to disk before the failure
        raise


async def _read_uploads(request: Request, runtime: Runtime, uploads: list) -> tuple[list, dict[str, str]]:
    settings = runtime.settings
    ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
    fields: dict[str, str] = {}
    if ctype == "multipart/form-data":
        form = await request.form(max_files=settings.max_files + 1, max_fields=64)
        files = [v for k, v in form.multi_items() if k == "file"]
        fields = {k: v for k, v in form.multi_items() if isinstance(v, str)}
        stray = [k for k, v in form.multi_items() if isinstance(v, UploadFile) and k != "file"]
        if stray:
            raise BadRequest(f"upload files in the form field 'file' (got {stray})")
        for f in files:
            if not isinstance(f, UploadFile):
                raise BadRequest("the form field 'file' must hold a file")
            if f.size is not None and f.size > SPILL_BYTES:  # already on disk: keep it there
                uploads.append(await runtime.preprocess_light(spill, f.file, settings.max_upload_bytes, f.filename))
                continue
            data = await f.read(settings.max_upload_bytes + 1)
            if len(data) > settings.max_upload_bytes:
                raise PayloadTooLarge(f"file {f.filename!r} exceeds {settings.max_upload_bytes} bytes",
                                      limit=settings.max_upload_bytes)
            uploads.append(data)
    elif ctype == "application/json":
        body = await read_json(request, runtime)
        if not isinstance(body, dict):
            raise BadRequest("the JSON body must be an object")
        urls = body.get("urls") or ([body["url"]] if "url" in body else [])
        if not isinstance(urls, list) or not urls:
            raise BadRequest("a JSON body needs 'urls': [...] (or upload files as multipart or raw bytes)")
        # Counted and checked before the first download.
        if len(urls) > settings.max_files:
            raise PayloadTooLarge(f"{len(urls)} URLs, over the limit of {settings.max_files} per request",
                                  limit=settings.max_files)
        fields = {k: str(v) for k, v in body.items() if k in OPTION_NAMES}
        checked = [check_url(url, settings.allow_url_fetch, settings.allowlist) for url in urls]
        uploads += [await fetch(url, settings.max_upload_bytes, settings.fetch_timeout_s) for url in checked]
    else:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > SPILL_BYTES:
            uploads.append(await spill_stream(request.stream(), settings.max_upload_bytes))
        else:
            uploads.append(await request.body())
    if not uploads or all(len(u) == 0 for u in uploads):
        raise BadRequest("no media: send multipart field 'file' or the raw bytes as the body")
    if len(uploads) > settings.max_files:
        raise PayloadTooLarge(f"{len(uploads)} files, over the limit of {settings.max_files} per request",
                              limit=settings.max_files)
    return uploads, fields


async def read_body(request: Request) -> bytes:
    """The whole body, not kept on the request (Starlette's `body()` keeps it as long as the
    request lives: for /decode, while a long video is decoded). The gate bounds its size."""
    return b"".join([chunk async for chunk in request.stream()])


async def read_json(request: Request, runtime: Runtime) -> Any:
    """The body as JSON, parsed in the light pre-processing pool with size and depth limits."""
    settings = runtime.settings
    data = await read_body(request)
    return await runtime.preprocess_light(parse_json, data, settings.max_json_bytes, settings.max_json_depth)


def parse_options(request: Request, fields: dict[str, str]) -> tuple[Options, dict[str, str]]:
    """Options from query parameters and form fields (form wins)."""
    raw = {k: v for k, v in request.query_params.items() if k in OPTION_NAMES}
    raw.update({k: v for k, v in fields.items() if k in OPTION_NAMES})
    return options_from_raw(raw), raw


def options_from_raw(raw: dict[str, str]) -> Options:
    """Checked options from their text values (a job re-reads them from its record)."""
    opts = Options()
    try:
        if "tokens" in raw:
            if raw["tokens"] not in ("continuous", "discrete"):
                raise InvalidParameter("tokens must be 'continuous' or 'discrete'")
            opts.tokens = raw["tokens"]
        if "format" in raw:
            opts.format = raw["format"].lower()
            if opts.format not in OUTPUT_FORMATS:
                raise InvalidParameter(f"format must be one of {sorted(OUTPUT_FORMATS)}, got {raw['format']!r}")
        if "fps" in raw:
            opts.fps = _number(raw["fps"], "fps", low=0.0, high=MAX_FPS, open_low=True)
        if "max_frames" in raw:
            opts.max_frames = int(raw["max_frames"])
        if "start" in raw:
            opts.start = _number(raw["start"], "start", low=0.0)
        if "end" in raw:
            opts.end = _number(raw["end"], "end", low=0.0)
        if "background" in raw:
            opts.background = _colour(raw["background"])
        if "array_format" in raw:
            if raw["array_format"] not in ("base64", "list"):
                raise InvalidParameter("array_format must be 'base64' or 'list'")
            opts.array_format = raw["array_format"]
        if "preview" in raw:
            if raw["preview"] not in ("none", "grid", "turntable"):
                raise InvalidParameter("preview must be 'none', 'grid' or 'turntable'")
            opts.preview = raw["preview"]
        opts.score = flag(raw, "score")
        flag(raw, "dense")  # read by /encode; checked here, before any decoding
    except ValueError as exc:
        raise InvalidParameter(f"bad option value: {exc}") from None
    if opts.max_frames is not None and opts.max_frames <= 0:
        raise InvalidParameter("max_frames must be positive")
    if opts.end is not None and opts.end <= opts.start:
        raise InvalidParameter("end must be after start")
    return opts


def _number(text: str, name: str, low: float, high: float = 1e9, open_low: bool = False) -> float:
    """A finite float within [low, high] (or (low, high]); NaN and infinities are refused."""
    value = float(text)
    if not math.isfinite(value) or value < low or (open_low and value == low) or value > high:
        bound = f"({low:g}, {high:g}]" if open_low else f"[{low:g}, {high:g}]"
        raise InvalidParameter(f"{name} must be a finite number in {bound}, got {text!r}", limit=high)
    return value


def _colour(text: str) -> tuple[int, int, int]:
    text = text.strip().lstrip("#")
    if len(text) == 6 and all(c in "0123456789abcdefABCDEF" for c in text):
        return tuple(int(text[i:i + 2], 16) for i in (0, 2, 4))  # type: ignore[return-value]
    parts = [int(p) for p in text.split(",")]
    if len(parts) != 3 or not all(0 <= p <= 255 for p in parts):
        raise InvalidParameter("background must be 'RRGGBB' or 'r,g,b'")
    return tuple(parts)  # type: ignore[return-value]


def flag(raw: dict[str, str], name: str) -> bool:
    value = raw.get(name, "false").lower()
    if value not in TRUE + FALSE:
        raise InvalidParameter(f"{name} must be true or false, got {raw[name]!r}")
    return value in TRUE


TRUE, FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def wants(request: Request, media_type: str) -> bool:
    return media_type in request.headers.get("accept", "")


def is_safetensors(request: Request) -> bool:
    return request.headers.get("content-type", "").split(";")[0].strip().lower() in (SAFETENSORS,
                                                                                       "application/x-safetensors")
