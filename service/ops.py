"""The operations behind /encode, /tokenize and /reconstruct, free of HTTP: items and options
in, an Answer (bytes or a temporary file, media type, headers) out. The synchronous routes and
the job API (service.jobs) both call these, so a job's result is exactly the route's answer."""

from __future__ import annotations

import asyncio
import math
import os
import zipfile
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import numpy as np
import torch

from model.api import Tokens

from . import streaming
from . import token_files as tf
from .arrays import NPY, SAFETENSORS, array_to_json, finite_list, to_npy, to_safetensors
from .deps import flag
from .errors import ClientClosedRequest, InvalidParameter, NotAcceptable, Overloaded, PayloadTooLarge
from .outputs import MEDIA_TYPES, choose_format, preview_file, render, render_image, score_3d, zip_files
from .inputs import Options
from .pipeline import Item, compact_indices, round_trip_psnr, token_grid, tokens_to_json
from .runtime import AS_JOB, Runtime, Timing, abandon
from .streaming import Progress, Tile
from .worker.jobs import Job, JobResult

Watch = Callable[[], Awaitable[None]]  # returns when the caller gives up (disconnect, cancel)


@dataclass
class Call:
    """Who asked and how: the Accept header, a watch for giving up, and progress to report."""

    accept: str = ""
    watch: Watch | None = None
    progress: Progress | None = None

    def wants(self, media_type: str) -> bool:
        return media_type in self.accept


@dataclass
class Answer:
    media_type: str
    headers: dict = field(default_factory=dict)
    body: bytes | None = None
    path: str | None = None  # a temporary file: the caller sends it and deletes it
    json: object | None = None


def progress_for(items: list[Item]) -> Progress:
    """Tiles for streamed videos, one step for every other item."""
    unit = "tiles" if any(i.streamed for i in items) else "items"
    return Progress(sum(i.stream.plan.tiles if i.streamed else 1 for i in items), unit=unit)


def model_ref(runtime: Runtime, mode: str = "continuous") -> dict:
    """The model that made these tokens (tokens=discrete may come from a second model)."""
    info = runtime.model_info.get("modes", {}).get(mode) or runtime.model_info
    return {"variant": info.get("variant"), "sha256": info.get("sha256"), "trained": info.get("trained")}


def _jobs(runtime: Runtime, op: str, items: list[Item], mode: str = "continuous", **kw) -> list[Job]:
    return [Job(runtime.scheduler.next_id(), op, mode=mode, batch=i.batch, **kw) for i in items]


def check_mode(runtime: Runtime, mode: str) -> None:
    if mode == "discrete" and not runtime.model_info.get("discrete"):
        raise InvalidParameter(f"model {runtime.model_info.get('variant')!r} has no quantizer: "
                               "tokens=discrete is unavailable (use tokens=continuous)")


async def _guarded(call: Call, work: Awaitable):
    """Run `work` unless the caller gives up first; then it is cancelled (queued tiles dropped)."""
    if call.watch is None:
        return await work
    task, watch = asyncio.ensure_future(work), asyncio.ensure_future(call.watch())
    try:
        done, _ = await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task not in done:
            raise ClientClosedRequest("the caller went away before the answer was ready")
        return task.result()
    finally:
        abandon(watch)
        if not task.done():
            abandon(task)


async def _infer_plain(runtime: Runtime, call: Call, jobs: list[Job]) -> tuple[list[JobResult], Timing]:
    if not jobs:
        return [], Timing()
    deadline = asyncio.get_running_loop().time() + runtime.model_deadline()[0]
    while True:
        try:
            results, timing = await runtime.infer(call.watch, jobs)
            break
        except Overloaded as exc:
            # A job waits out a full queue (for its deadline); a request is answered 429.
            if not AS_JOB.get() or asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(min(1.0, exc.retry_after or 1.0))
    if call.progress:
        for _ in jobs:
            call.progress.advance()
    return results, timing


def _merge(a: Timing, b: Timing) -> Timing:
    return Timing(max(a.queue_ms, b.queue_ms), a.compute_ms + b.compute_ms, max(a.batch_size, b.batch_size))


# ----------------------------------------------------------------------------- /encode
async def encode(runtime: Runtime, items: list[Item], options: Options, raw: dict, call: Call) -> Answer:
    dense = flag(raw, "dense")
    for item in items:
        if dense and item.streamed and item.stream.plan.expected / 4 * math.prod(item.stream.grid) > \
                runtime.settings.max_item_tokens:
            raise PayloadTooLarge("dense features of a video this long would not fit the per-item token limit "
                                  f"({runtime.settings.max_item_tokens}); use /tokenize, which streams",
                                  limit=runtime.settings.max_item_tokens)
    plain = [i for i in items if not i.streamed]
    results, timing = await _infer_plain(runtime, call, _jobs(runtime, "embed", plain, dense=dense))
    by_item: dict[int, tuple] = {id(i): (r.embedding, r.features, i.batch.coords[:, 1:] if dense else None)
                                 for i, r in zip(plain, results)}
    for item in items:
        if item.streamed:
            emb, feats, coords, run = await _guarded(call, _embed_stream(runtime, item, dense, call.progress))
            by_item[id(item)] = (emb, feats, coords)
            timing = _merge(timing, run.timing)
    emb = np.stack([by_item[id(i)][0].numpy() for i in items]).astype(np.float32)
    headers = timing.headers()
    if call.wants(SAFETENSORS):
        arrays = {"embeddings": emb}
        if dense:
            arrays.update({f"item{k}.features": by_item[id(i)][1].numpy() for k, i in enumerate(items)})
        meta = {"model": model_ref(runtime), "items": [{"modality": i.modality, "kind": i.kind} for i in items]}
        return Answer(SAFETENSORS, headers, body=to_safetensors(arrays, meta))
    if call.wants(NPY):
        return Answer(NPY, headers, body=to_npy(emb))
    out = []
    for k, item in enumerate(items):
        entry = {"index": k, "modality": item.modality, "kind": item.kind, "dim": int(emb.shape[1]),
                 "embedding": finite_list(emb[k], "the embedding")}
        if dense:
            _, feats, coords = by_item[id(item)]
            entry["features"] = array_to_json(feats.numpy(), options.array_format, "the features")
            entry["coords"] = array_to_json(coords.numpy(), options.array_format)
        out.append(entry)
    return Answer("application/json", headers, json={"model": model_ref(runtime), "items": out})


async def _embed_stream(runtime: Runtime, item: Item, dense: bool, progress: Progress | None):
    """(embedding, features or None, coords or None, run). Dense features are the answer, so
    they are kept (bounded by the per-item token check in `encode`)."""
    feats, coords = [], []

    def keep(tile: Tile) -> None:
        feats.append(tile.result.features)
        c = tile.job.batch.coords[:, 1:].clone()
        c[:, 0] += tile.index * 4  # tiles count t from their own start
        coords.append(c)

    emb, run = await streaming.embed(runtime, item.stream, progress, dense=dense, also=keep if dense else None)
    item.media["frames"] = run.frames
    if not dense:
        return emb, None, None, run
    return emb, torch.cat(feats), torch.cat(coords), run


# ----------------------------------------------------------------------------- /tokenize
async def tokenize(runtime: Runtime, items: list[Item], options: Options, call: Call) -> Answer:
    check_mode(runtime, options.tokens)
    plain = [i for i in items if not i.streamed]
    results, timing = await _infer_plain(runtime, call, _jobs(runtime, "tokenize", plain, options.tokens))
    by_item = {id(i): r for i, r in zip(plain, results)}
    head = {"model": model_ref(runtime, options.tokens), "mode": options.tokens}
    if call.wants(NPY) and len(items) != 1:
        raise NotAcceptable("npy holds one array: ask for one item, or use JSON or safetensors")
    if not any(i.streamed for i in items):
        return _tokens_answer(head, items, [by_item[id(i)] for i in items], options, call, timing)
    streamed: dict[int, tf.StreamedTokens] = {}
    try:
        for k, item in enumerate(items):
            if item.streamed:
                streamed[id(item)], run = await _guarded(call, _tokenize_stream(runtime, item, k, options, call))
                timing = _merge(timing, run.timing)
        return await runtime.postprocess(_assemble_tokens, head, items, by_item, streamed, options, call, timing)
    finally:
        for s in streamed.values():
            s.remove()


async def _tokenize_stream(runtime: Runtime, item: Item, index: int, options: Options, call: Call):
    discrete = options.tokens == "discrete"
    width = runtime.model_info.get("num_codebooks" if discrete else "latent_channels") or 0
    value_dtype = np.dtype(np.uint16 if discrete and runtime.model_info.get("codebook_size", 0) <= 2**16
                           else (np.int32 if discrete else np.float32))
    spool = tf.StreamedTokens(tf.Spool(np.dtype(np.int32), 4), tf.Spool(value_dtype, width),
                              "indices" if discrete else "latents",
                              {"index": index, "modality": item.modality, "kind": item.kind})

    def write(tile: Tile) -> None:
        tokens = tile.result.tokens
        coords = tokens.coords[:, 1:].numpy().astype(np.int32)
        coords[:, 0] += tile.index * 4  # tiles count t from their own start; the clip from its own
        values = tokens.indices.numpy() if discrete else tokens.latents.numpy()
        if spool.values.width != values.shape[1]:
            spool.values.width = values.shape[1]
        spool.coords.append(coords)
        spool.values.append(values)

    try:
        run = await streaming.tokenize(runtime, item.stream, options.tokens, write, call.progress)
    except BaseException:
        spool.remove()
        raise
    item.media["frames"] = run.frames
    spool.entry.update(media=item.media, num_tokens=spool.coords.rows)
    return spool, run


def _tokens_answer(head: dict, items: list[Item], results: list[JobResult], options: Options, call: Call,
                   timing: Timing) -> Answer:
    entries = [tokens_to_json(k, item, r.tokens, options.array_format)
               for k, (item, r) in enumerate(zip(items, results))]
    headers = timing.headers()
    if call.wants(SAFETENSORS):
        arrays, meta_items = {}, []
        for k, (entry, r) in enumerate(zip(entries, results)):
            arrays[f"item{k}.coords"] = r.tokens.coords[:, 1:].numpy().astype(np.int32)
            if r.tokens.indices is not None:
                arrays[f"item{k}.indices"] = compact_indices(r.tokens.indices)
            else:
                arrays[f"item{k}.latents"] = r.tokens.latents.numpy()
            meta_items.append({key: v for key, v in entry.items() if key not in ("coords", "latents", "indices")})
        return Answer(SAFETENSORS, headers, body=to_safetensors(arrays, {**head, "items": meta_items}))
    if call.wants(NPY):
        t = results[0].tokens
        values = t.indices.numpy() if t.indices is not None else t.latents.numpy()
        coords = t.coords[:, 1:].numpy()
        table = np.concatenate([coords.astype(values.dtype if t.indices is None else np.int32),
                                values.astype(np.float32 if t.indices is None else np.int32)], 1)
        headers["X-Columns"] = "t,x,y,z," + ("indices" if t.indices is not None else "latents")
        return Answer(NPY, headers, body=to_npy(table))
    return Answer("application/json", headers, json={**head, "items": entries})


def _assemble_tokens(head: dict, items: list[Item], by_item: dict, streamed: dict, options: Options, call: Call,
                     timing: Timing) -> Answer:
    """The answer for a request with streamed videos, written to a temporary file."""
    headers = timing.headers()
    if call.wants(NPY):
        path = streaming.temp_path(".npy")
        tf.write_npy_table(path, streamed[id(items[0])])
        headers["X-Columns"] = "t,x,y,z," + streamed[id(items[0])].field
        return Answer(NPY, headers, path=path)
    if call.wants(SAFETENSORS):
        arrays, meta_items = [], []
        for k, item in enumerate(items):
            if item.streamed:
                s = streamed[id(item)]
                arrays += [(f"item{k}.coords", s.coords), (f"item{k}.{s.field}", s.values)]
                meta_items.append(s.entry)
                continue
            t = by_item[id(item)].tokens
            arrays.append((f"item{k}.coords", t.coords[:, 1:].numpy().astype(np.int32)))
            arrays.append((f"item{k}.indices", compact_indices(t.indices)) if t.indices is not None
                          else (f"item{k}.latents", t.latents.numpy()))
            entry = tokens_to_json(k, item, t, options.array_format)
            meta_items.append({key: v for key, v in entry.items() if key not in ("coords", "latents", "indices")})
        path = streaming.temp_path(".safetensors")
        tf.write_safetensors(path, arrays, {**head, "items": meta_items})
        return Answer(SAFETENSORS, headers, path=path)
    entries = [streamed[id(i)] if i.streamed else tokens_to_json(k, i, by_item[id(i)].tokens, options.array_format)
               for k, i in enumerate(items)]
    path = streaming.temp_path(".json")
    tf.write_json(path, head, entries, options.array_format)
    return Answer("application/json", headers, path=path)


# ----------------------------------------------------------------------------- /reconstruct
@dataclass
class Output:
    """One item's reconstruction: rendered bytes, or a file a streamed video was muxed into."""

    name: str
    media_type: str
    body: bytes | None = None
    path: str | None = None
    tokens: int = 0
    grid: str = ""
    psnr: float | None = None


async def reconstruct(runtime: Runtime, items: list[Item], options: Options, call: Call) -> Answer:
    check_mode(runtime, options.tokens)
    gaussians = bool(runtime.model_info.get("gaussians"))
    plain = [i for i in items if not i.streamed]
    jobs = _jobs(runtime, "reconstruct", plain, options.tokens, gaussians=gaussians, pixels=True)
    results, timing = await _infer_plain(runtime, call, jobs)
    by_item = {id(i): r for i, r in zip(plain, results)}
    outputs: list[Output] = []
    extra_headers: dict[str, list[str]] = {"X-Render-PSNR": [], "X-Render-SSIM": [], "X-Audio": []}
    try:
        for k, item in enumerate(items):
            if item.streamed:
                fmt = choose_format("video", options.format, False)
                rec = await _guarded(call, streaming.reconstruct(runtime, item.stream, options.tokens, fmt,
                                                                 call.progress))
                item.media["frames"] = rec.run.frames
                timing = _merge(timing, rec.run.timing)
                outputs.append(Output(f"item{k}.{fmt}", MEDIA_TYPES[fmt], path=rec.path, tokens=rec.run.tokens,
                                      grid=rec.run.token_grid, psnr=rec.psnr))
                extra_headers["X-Audio"].append(rec.audio)
                continue
            r = by_item[id(item)]
            for out in await _render_plain(runtime, k, item, r, options, extra_headers):
                outputs.append(await _kept(runtime, out))
        return await _files_answer(runtime, outputs, timing, extra_headers)
    except BaseException:
        _discard(outputs)
        raise


async def _render_plain(runtime: Runtime, k: int, item: Item, r: JobResult, options: Options,
                        extra: dict[str, list[str]]) -> list[Output]:
    chosen = choose_format(item.kind, options.format, r.gaussians is not None)
    if item.kind == "image":  # the common case: pixels rebuilt once for the file and the score
        data, score = await runtime.postprocess(render_image, item, r, chosen)
    else:
        data = await runtime.postprocess(render, item.kind, r.tubelets, item.batch.coords, item.media,
                                         r.gaussians, chosen)
        score = await runtime.postprocess(round_trip_psnr, item, r)
    out = [Output(f"item{k}.{chosen}", MEDIA_TYPES[chosen], body=data, tokens=len(item.batch.coords),
                  grid=token_grid(item.batch.coords, item.kind), psnr=score)]
    if options.score and item.views is not None and r.gaussians is not None:
        psnr3d, ssim3d = await runtime.postprocess(score_3d, r.gaussians, item.views)
        extra["X-Render-PSNR"].append(f"{psnr3d:.2f}")
        extra["X-Render-SSIM"].append(f"{ssim3d:.4f}")
    if options.preview != "none" and r.gaussians is not None:
        name, preview = await runtime.postprocess(preview_file, r.gaussians, options.preview)
        out.append(Output(f"item{k}_{name}", "application/octet-stream", body=preview))
    return out


# An output over this goes to a temporary file as soon as it is made, so a request holds at
# most one large output in memory whatever its file count (16 outputs of 4096x4096 were 510 MB,
# held, then copied into the zip: 1.2 GB of peak memory for a /decode body of a few MB).
SPILL_BYTES = 1 << 20


async def _kept(runtime: Runtime, out: Output) -> Output:
    if out.body is not None and len(out.body) > SPILL_BYTES:
        out.path = await runtime.postprocess(_to_file, out.body, os.path.splitext(out.name)[1])
        out.body = None
    return out


def _to_file(data: bytes, suffix: str) -> str:
    path = streaming.temp_path(suffix)
    with open(path, "wb") as f:
        f.write(data)
    return path


def _describe(headers: dict, outputs: list[Output], extra: dict[str, list[str]]) -> None:
    main = [o for o in outputs if o.tokens]
    headers["X-Tokens"] = ",".join(str(o.tokens) for o in main)
    headers["X-Token-Grid"] = ",".join(o.grid for o in main)
    if any(o.psnr is not None for o in main):
        headers["X-Round-Trip-PSNR"] = ",".join("" if o.psnr is None else f"{o.psnr:.2f}" for o in main)
    for name, values in extra.items():
        if values:
            headers[name] = ",".join(values)


async def _files_answer(runtime: Runtime, outputs: list[Output], timing: Timing,
                        extra_headers: dict[str, list[str]]) -> Answer:
    headers = timing.headers()
    _describe(headers, outputs, extra_headers)
    return await _package(runtime, outputs, headers)


def _discard(outputs: list[Output]) -> None:
    """The temporary files of an answer that will not be sent."""
    for o in outputs:
        if o.path and os.path.exists(o.path):
            os.unlink(o.path)


async def _package(runtime: Runtime, outputs: list[Output], headers: dict) -> Answer:
    if len(outputs) == 1:
        o = outputs[0]
        headers["Content-Disposition"] = f'inline; filename="{o.name}"'
        return Answer(o.media_type, headers, body=o.body, path=o.path)
    if not any(o.path for o in outputs):
        return Answer("application/zip", headers, body=zip_files([(o.name, o.body) for o in outputs]))
    path = streaming.temp_path(".zip")
    await runtime.postprocess(_zip_to_file, path, outputs)
    return Answer("application/zip", headers, path=path)


def _zip_to_file(path: str, outputs: list[Output]) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for o in outputs:
            if o.path:
                z.write(o.path, o.name)
                os.unlink(o.path)
            else:
                z.writestr(o.name, o.body)


# ----------------------------------------------------------------------------- /decode
async def decode(runtime: Runtime, decoded: list[tuple], options: Options, call: Call) -> Answer:
    """(tokens, kind, media) per item -> media files. A video longer than a tile of latent frames
    is decoded tile by tile into a file (streaming.decode); the rest in one batch."""
    gaussians = bool(runtime.model_info.get("gaussians"))
    plain = [d for d in decoded if not _streamed_decode(d[0], d[1])]
    jobs = [Job(runtime.scheduler.next_id(), "decode", tokens=t, gaussians=gaussians, pixels=True) for t, _, _ in plain]
    results, timing = await _infer_plain(runtime, call, jobs)
    by_item = {id(d): r for d, r in zip(plain, results)}
    outputs: list[Output] = []
    try:
        for k, item in enumerate(decoded):
            tokens, kind, media = item
            grid = token_grid(tokens.coords, kind)
            if _streamed_decode(tokens, kind):
                fmt = choose_format(kind, options.format, False)
                done = await _guarded(call, streaming.decode(runtime, tokens, media, fmt))
                timing = _merge(timing, done.timing)
                outputs.append(Output(f"item{k}.{fmt}", MEDIA_TYPES[fmt], path=done.path, tokens=done.tokens, grid=grid))
                continue
            r = by_item[id(item)]
            chosen = choose_format(kind, options.format, r.gaussians is not None)
            data = await runtime.postprocess(render, kind, r.tubelets, tokens.coords, media, r.gaussians, chosen)
            outputs.append(await _kept(runtime, Output(f"item{k}.{chosen}", MEDIA_TYPES[chosen], body=data,
                                                       tokens=len(tokens.coords), grid=grid)))
        return await _files_answer(runtime, outputs, timing, {})
    except BaseException:
        _discard(outputs)
        raise


def _streamed_decode(tokens: Tokens, kind: str) -> bool:
    return kind == "video" and streaming.token_tiles(tokens) > 1
