"""The command line's file operations: in-process (the same scheduler, streaming and operations
as the HTTP API, with the model in a thread), or against a running server's job API
(`--server URL`). Long videos and many files show a progress bar (steps, rate, ETA)."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
import time
from pathlib import Path

from tqdm import tqdm

from .errors import ServiceError
from .responses import render_json

EXTENSIONS = {"image/png": "png", "image/jpeg": "jpeg", "image/webp": "webp", "video/mp4": "mp4",
              "video/webm": "webm", "application/zip": "zip"}


def option_args(args) -> dict[str, str]:
    """The API's options from the command line's flags (only those given)."""
    raw = {"tokens": args.tokens, "format": args.format, "fps": args.fps, "max_frames": args.max_frames,
           "start": args.start, "end": args.end}
    return {k: str(v) for k, v in raw.items() if v is not None and not (k == "tokens" and v == "continuous")}


class Bar:
    """One progress bar per file, shown when stderr is a terminal or when asked for."""

    def __init__(self, name: str, enabled: bool):
        self.bar = tqdm(total=1, desc=name, unit="tile", disable=not enabled, leave=True, file=sys.stderr,
                        dynamic_ncols=True)

    def update(self, done: int, total: int, unit: str) -> None:
        self.bar.unit = unit.rstrip("s")
        self.bar.total = max(total, done, 1)
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        self.bar.close()


# ----------------------------------------------------------------------------- results
class Output:
    """Writes each file's answer: media files beside the input (or -o), JSON to stdout."""

    def __init__(self, args):
        self.args, self.docs = args, []

    def add(self, source: str, media_type: str, headers: dict, path: str | None, body: bytes | None) -> None:
        if self.args.command == "reconstruct":
            self._media(source, media_type, headers, path, body)
        else:
            data = Path(path).read_bytes() if path else body
            if path:
                os.unlink(path)
            self.docs.append((source, json.loads(data)))

    def _media(self, source: str, media_type: str, headers: dict, path: str | None, body: bytes | None) -> None:
        name = headers.get("content-disposition", headers.get("Content-Disposition", ""))
        ext = name.rsplit(".", 1)[-1].rstrip('"') if "." in name else EXTENSIONS.get(media_type, "bin")
        single = self.args.output and len(self.args.files) == 1
        out = Path(self.args.output) if single else Path(source).with_suffix(f".rec.{ext}")
        if path:
            shutil.move(path, out)
        else:
            out.write_bytes(body)
        score = headers.get("x-round-trip-psnr", headers.get("X-Round-Trip-PSNR"))
        print(f"{source} -> {out}" + (f" (PSNR {score} dB)" if score else ""))

    def finish(self) -> None:
        if self.args.command == "encode":
            print(json.dumps({"items": [{"file": f, "embedding": d["items"][0]["embedding"]} for f, d in self.docs]}))
        elif self.args.command == "tokenize" and self.docs:
            head = {k: v for k, v in self.docs[0][1].items() if k != "items"}
            items = [dict(d["items"][0], index=i, file=f) for i, (f, d) in enumerate(self.docs)]
            print(json.dumps({**head, "items": items}))


# ----------------------------------------------------------------------------- in-process
async def run_local(args, settings) -> int:
    from . import ops
    from .deps import options_from_raw
    from .runtime import AS_JOB, Runtime, default_backend_factory

    AS_JOB.set(True)  # no request waits on this run's model passes: job_timeout_s bounds them
    settings = settings.model_copy(update={"worker": "thread"})
    runtime = Runtime(settings, default_backend_factory(settings))
    runtime.start()
    try:
        await _wait_ready(runtime)
        raw = option_args(args)
        options = options_from_raw(raw)
        output = Output(args)
        for source in args.files:
            data = await asyncio.get_running_loop().run_in_executor(None, Path(source).read_bytes)
            items = await runtime.preprocess_all([data], options)
            bar = Bar(Path(source).name, args.progress)
            progress = ops.progress_for(items)
            progress.on_change = lambda p, bar=bar: bar.update(p.done, p.total, p.unit)
            call = ops.Call(accept="", progress=progress)
            try:
                if args.command == "encode":
                    answer = await ops.encode(runtime, items, options, raw, call)
                elif args.command == "tokenize":
                    answer = await ops.tokenize(runtime, items, options, call)
                else:
                    answer = await ops.reconstruct(runtime, items, options, call)
            finally:
                bar.close()
            body = render_json(answer.json) if answer.json is not None else answer.body
            output.add(source, answer.media_type, answer.headers, answer.path, body)
        output.finish()
        return 0
    finally:
        await asyncio.get_running_loop().run_in_executor(None, runtime.stop)


async def _wait_ready(runtime) -> None:
    while not runtime.scheduler.ready:
        if runtime.scheduler.start_error:
            raise RuntimeError(f"the model did not load: {runtime.scheduler.start_error}")
        await asyncio.sleep(0.05)


# ----------------------------------------------------------------------------- --server
def run_remote(args) -> int:
    """Submit each file to the server's job API, follow its progress, fetch its result."""
    import httpx

    key = args.api_key or os.environ.get("ATOKEN_API_KEY")
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    output = Output(args)
    with httpx.Client(base_url=args.server.rstrip("/"), headers=headers, timeout=60) as client:
        for source in args.files:
            with open(source, "rb") as f:
                r = client.post(f"/jobs/{args.command}", params=option_args(args),
                                files={"file": (Path(source).name, f)})
            _raise_for(r)
            job = r.json()
            bar = Bar(Path(source).name, args.progress)
            try:
                job = _follow(client, job, bar)
            except KeyboardInterrupt:
                client.delete(job["links"]["self"])
                print(f"{source}: cancelled", file=sys.stderr)
                return 130
            finally:
                bar.close()
            r = client.get(job["links"]["result"])
            _raise_for(r)
            output.add(source, r.headers.get("content-type", "").split(";")[0], dict(r.headers), None, r.content)
    output.finish()
    return 0


def _follow(client, job: dict, bar: Bar) -> dict:
    while job["status"] in ("queued", "running"):
        time.sleep(0.5)
        r = client.get(job["links"]["self"])
        _raise_for(r)
        job = r.json()
        p = job["progress"]
        bar.update(p["done"], p["total"], p["unit"])
    if job["status"] != "succeeded":
        error = job.get("error") or {"message": job["status"]}
        raise RemoteError(job.get("status"), error.get("message", ""))
    return job


class RemoteError(ServiceError):
    def __init__(self, status, message: str):
        super().__init__(message)
        self.status = status


def _raise_for(r) -> None:
    if r.status_code >= 400:
        try:
            message = r.json()["error"]["message"]
        except Exception:  # noqa: BLE001 - not our JSON: show the status line
            message = r.text[:200]
        raise RemoteError(r.status_code, message)


# ----------------------------------------------------------------------------- datasets
def run_dataset(args, settings) -> int:
    from .bulk.run import RunConfig, tokenize_dataset

    options = {k: str(v) for k, v in {"fps": args.fps, "max_frames": args.max_frames, "start": args.start,
                                      "end": args.end}.items() if v is not None}
    cfg = RunConfig(args.src, args.out, args.tokens, args.embeddings, args.shard_rows, args.dtype, options,
                    args.engine, args.threads, args.progress, batch_tokens=args.batch_tokens)
    print(dataset_summary(tokenize_dataset(cfg, settings)), file=sys.stderr)
    return 0


def dataset_summary(summary: dict) -> str:
    """tokenize-dataset's closing line, e.g. '1 input in 3.9 s (...): 1 row, 0 errors'."""
    skipped = summary["skipped_shards"]
    return (f"{_count(summary['items'], 'input')} in {summary['seconds']:.1f} s "
            f"({summary['items_per_s']:.1f} items/s, {summary['tokens_per_s']:.0f} tokens/s): "
            f"{_count(summary['rows'], 'row')}, {_count(summary['errors'], 'error')}"
            + (f", {_count(skipped, 'finished shard')} skipped" if skipped else ""))


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"


def decode_row(args, settings) -> int:
    """One row of a tokenized dataset -> the media its tokens decode to (a spot check)."""
    from .bulk.reader import read_rows
    from .outputs import choose_format, render
    from .pipeline import tokens_from_json
    from .worker.backends import LocalBackend
    from .worker.jobs import Job

    row = next((r for r in read_rows(args.out) if r["key"] == args.key), None)
    if row is None:
        raise RemoteError(404, f"no row with key {args.key!r} in {args.out}")
    backend = LocalBackend(settings.model_spec, timed=False)
    info = backend.start()
    field = "indices" if "indices" in row else "latents"
    values = row[field].astype("float32") if field == "latents" else row[field]
    entry = {"kind": row["kind"], "media": row["media"], "coords": row["coords"], field: values}
    tokens, kind, media = tokens_from_json(entry, 0, settings.without_deadlines().limits, info)
    if kind == "video":  # tile by tile into the file, as /decode does: a long row's frames are never held
        fmt = choose_format(kind, args.format, False)
        out = _decoded_path(args, fmt)
        _decode_video_file(backend, tokens, media, fmt, out)
    else:
        result = _checked(backend.run([Job(0, "decode", tokens=tokens, gaussians=bool(info.get("gaussians")))])[0])
        fmt = choose_format(kind, args.format, result.gaussians is not None)
        out = _decoded_path(args, fmt)
        out.write_bytes(render(kind, result.tubelets, tokens.coords, media, result.gaussians, fmt))
    print(f"{args.key} -> {out}")
    return 0


def _decoded_path(args, fmt: str) -> Path:
    return Path(args.output) if args.output else Path(Path(args.key).name).with_suffix(f".rec.{fmt}")


def _checked(result):
    if result.error:
        raise RemoteError(422, result.error[1])
    return result


def _decode_video_file(backend, tokens, media: dict, fmt: str, out: Path) -> None:
    from .media import video as vid
    from .streaming import tile_tokens, tiles_for, write_tile
    from .worker.jobs import Job

    writer = vid.VideoWriter(str(out), media["fps"], fmt)
    try:
        for k in range(tiles_for(tokens, media["frames"])):
            job = Job(k, "decode", tokens=tile_tokens(tokens, k), pixels=True)
            write_tile(writer, k, job, _checked(backend.run([job])[0]), media["frames"], (media["height"], media["width"]))
        writer.close()
    except BaseException:
        writer.abort()
        out.unlink(missing_ok=True)
        raise
