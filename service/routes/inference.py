"""POST /encode, /tokenize, /decode, /reconstruct. Thin: parse, queue, format."""

from __future__ import annotations

import numpy as np
from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from ..arrays import NPY, SAFETENSORS, array_to_json, from_safetensors, to_npy, to_safetensors
from ..deps import flag, get_runtime, is_safetensors, parse_options, read_json, read_uploads, wants
from ..errors import BadRequest, InvalidParameter, NotAcceptable, PayloadTooLarge
from ..outputs import MEDIA_TYPES, choose_format, preview_file, render, score_3d, zip_files
from ..pipeline import Item, compact_indices, round_trip_psnr, token_grid, tokens_from_json, tokens_to_json
from ..runtime import Runtime
from ..worker.jobs import Job

router = APIRouter(tags=["inference"])


def _model_ref(runtime: Runtime, mode: str = "continuous") -> dict:
    """The model that made these tokens (tokens=discrete may come from a second model)."""
    info = runtime.model_info.get("modes", {}).get(mode) or runtime.model_info
    return {"variant": info.get("variant"), "sha256": info.get("sha256"), "trained": info.get("trained")}


async def _items(request: Request, runtime: Runtime):
    uploads, fields = await read_uploads(request, runtime)
    options, raw = parse_options(request, fields)
    items = await runtime.preprocess_all(uploads, options)
    request.state.modality = ",".join(sorted({i.modality for i in items}))
    return items, options, raw


def _jobs(runtime: Runtime, op: str, items: list[Item], mode: str = "continuous", **kw) -> list[Job]:
    if mode == "discrete" and not runtime.model_info.get("discrete"):
        raise InvalidParameter(f"model {runtime.model_info.get('variant')!r} has no quantizer: "
                               "tokens=discrete is unavailable (use tokens=continuous)")
    return [Job(runtime.scheduler.next_id(), op, mode=mode, batch=i.batch, **kw) for i in items]


@router.post("/encode", summary="Global L2-normalised embedding per item")
async def encode(request: Request, runtime: Runtime = Depends(get_runtime)):
    items, options, raw = await _items(request, runtime)
    dense = flag(raw, "dense")
    results, timing = await runtime.infer(request, _jobs(runtime, "embed", items, dense=dense))
    emb = np.stack([r.embedding.numpy() for r in results]).astype(np.float32)
    headers = timing.headers()
    if wants(request, SAFETENSORS):
        arrays = {"embeddings": emb}
        if dense:
            arrays.update({f"item{i}.features": r.features.numpy() for i, r in enumerate(results)})
        meta = {"model": _model_ref(runtime), "items": [{"modality": i.modality, "kind": i.kind} for i in items]}
        return Response(to_safetensors(arrays, meta), media_type=SAFETENSORS, headers=headers)
    if wants(request, NPY):
        return Response(to_npy(emb), media_type=NPY, headers=headers)
    out = []
    for idx, (item, r) in enumerate(zip(items, results)):
        entry = {"index": idx, "modality": item.modality, "kind": item.kind, "dim": int(emb.shape[1]),
                 "embedding": emb[idx].tolist()}
        if dense:
            entry["features"] = array_to_json(r.features.numpy(), options.array_format)
            entry["coords"] = array_to_json(item.batch.coords[:, 1:].numpy(), options.array_format)
        out.append(entry)
    return JSONResponse({"model": _model_ref(runtime), "items": out}, headers=headers)


@router.post("/tokenize", summary="Continuous latents or discrete FSQ indices with 4D coords")
async def tokenize(request: Request, runtime: Runtime = Depends(get_runtime)):
    items, options, _ = await _items(request, runtime)
    results, timing = await runtime.infer(request, _jobs(runtime, "tokenize", items, options.tokens))
    entries = [tokens_to_json(i, item, r.tokens, options.array_format)
               for i, (item, r) in enumerate(zip(items, results))]
    doc = {"model": _model_ref(runtime, options.tokens), "mode": options.tokens, "items": entries}
    headers = timing.headers()
    if wants(request, SAFETENSORS):
        arrays, meta_items = {}, []
        for i, (entry, r) in enumerate(zip(entries, results)):
            arrays[f"item{i}.coords"] = r.tokens.coords[:, 1:].numpy().astype(np.int32)
            if r.tokens.indices is not None:
                arrays[f"item{i}.indices"] = compact_indices(r.tokens.indices)
            else:
                arrays[f"item{i}.latents"] = r.tokens.latents.numpy()
            meta_items.append({k: v for k, v in entry.items() if k not in ("coords", "latents", "indices")})
        meta = {"model": doc["model"], "mode": doc["mode"], "items": meta_items}
        return Response(to_safetensors(arrays, meta), media_type=SAFETENSORS, headers=headers)
    if wants(request, NPY):
        if len(results) != 1:
            raise NotAcceptable("npy holds one array: ask for one item, or use JSON or safetensors")
        t = results[0].tokens
        values = t.indices.numpy() if t.indices is not None else t.latents.numpy()
        coords = t.coords[:, 1:].numpy()
        table = np.concatenate([coords.astype(values.dtype if t.indices is None else np.int32),
                                values.astype(np.float32 if t.indices is None else np.int32)], 1)
        headers["X-Columns"] = "t,x,y,z," + ("indices" if t.indices is not None else "latents")
        return Response(to_npy(table), media_type=NPY, headers=headers)
    return JSONResponse(doc, headers=headers)


async def _media_response(runtime: Runtime, outputs: list[tuple[str, object, object, dict, dict | None]],
                          fmt: str | None, headers: dict, preview: str = "none") -> Response:
    """outputs: (kind, tubelets, coords, media, gaussians) per item; 3D previews ride along in a zip."""
    headers["X-Tokens"] = ",".join(str(len(coords)) for _, _, coords, _, _ in outputs)
    headers["X-Token-Grid"] = ",".join(token_grid(coords, kind) for kind, _, coords, _, _ in outputs)
    files = []
    for i, (kind, tubelets, coords, media, gaussians) in enumerate(outputs):
        chosen = choose_format(kind, fmt, gaussians is not None)
        data = await runtime.postprocess(render, kind, tubelets, coords, media, gaussians, chosen)
        files.append((f"item{i}.{chosen}", data, MEDIA_TYPES[chosen]))
        if preview != "none" and gaussians is not None:
            name, extra = await runtime.postprocess(preview_file, gaussians, preview)
            files.append((f"item{i}_{name}", extra, "application/octet-stream"))
    if len(files) == 1:
        name, data, mtype = files[0]
        headers["Content-Disposition"] = f'inline; filename="{name}"'
        return Response(data, media_type=mtype, headers=headers)
    archive = zip_files([(n, d) for n, d, _ in files])
    return Response(archive, media_type="application/zip", headers=headers)


@router.post("/reconstruct", summary="Media in, its reconstruction out (PNG / MP4 / PLY)")
async def reconstruct(request: Request, runtime: Runtime = Depends(get_runtime)):
    items, options, raw = await _items(request, runtime)
    gaussians = bool(runtime.model_info.get("gaussians"))
    jobs = _jobs(runtime, "reconstruct", items, options.tokens, gaussians=gaussians)
    results, timing = await runtime.infer(request, jobs)
    headers = timing.headers()
    scores = [await runtime.postprocess(round_trip_psnr, item, r) for item, r in zip(items, results)]
    if any(s is not None for s in scores):
        headers["X-Round-Trip-PSNR"] = ",".join("" if s is None else f"{s:.2f}" for s in scores)
    if options.score:
        scored = [await runtime.postprocess(score_3d, r.gaussians, item.views) if item.views is not None
                  and r.gaussians is not None else None for item, r in zip(items, results)]
        if any(s is not None for s in scored):
            headers["X-Render-PSNR"] = ",".join("" if s is None else f"{s[0]:.2f}" for s in scored)
            headers["X-Render-SSIM"] = ",".join("" if s is None else f"{s[1]:.4f}" for s in scored)
    outputs = [(item.kind, r.tubelets, item.batch.coords, item.media, r.gaussians) for item, r in zip(items, results)]
    return await _media_response(runtime, outputs, options.format, headers, options.preview)


@router.post("/decode", summary="Tokens (as /tokenize returned them) back to media")
async def decode(request: Request, runtime: Runtime = Depends(get_runtime)):
    options, _ = parse_options(request, {})
    if is_safetensors(request):
        entries = _entries_from_safetensors(await request.body())
    else:
        doc = await read_json(request, runtime)
        if not isinstance(doc, dict) or not isinstance(doc.get("items"), list) or not doc["items"]:
            raise BadRequest("expected the JSON /tokenize returned: an object with a non-empty 'items' list")
        entries = doc["items"]
    if len(entries) > runtime.settings.max_files:
        raise PayloadTooLarge(f"{len(entries)} items, over the limit of {runtime.settings.max_files}",
                              limit=runtime.settings.max_files)
    limits, model = runtime.settings.limits, runtime.model_info
    decoded = [tokens_from_json(e, i, limits, model) for i, e in enumerate(entries)]
    request.state.modality = ",".join(sorted({k for _, k, _ in decoded}))
    gaussians = bool(model.get("gaussians"))
    jobs = [Job(runtime.scheduler.next_id(), "decode", tokens=t, gaussians=gaussians) for t, _, _ in decoded]
    results, timing = await runtime.infer(request, jobs)
    outputs = [(kind, r.tubelets, t.coords, media, r.gaussians) for (t, kind, media), r in zip(decoded, results)]
    return await _media_response(runtime, outputs, options.format, timing.headers())


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
