"""HTTP load test on loopback, against the same model called in-process.

    python benchmarks/loadtest.py [--out docs/benchmarks/service.md]

Starts `python -m service serve` on a free 127.0.0.1 port, sends a bounded number of
requests per concurrency level to /encode and /reconstruct (a 256x256 PNG), and prints
throughput and p50/p99 latency. The in-process rows run the same pipeline (decode, model,
encode the PNG) and the model alone on batches of the same sizes.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import describe  # noqa: E402


def test_image(size: int = 256) -> bytes:
    """A 256x256 crop of a photograph as PNG, resized to size x size."""
    from tests import assets

    picture = Image.fromarray(np.asarray(Image.open(assets.image("astronaut.png")).convert("RGB"))[128:384, 128:384])
    if size != 256:
        picture = picture.resize((size, size), Image.BICUBIC)
    buf = io.BytesIO()
    picture.save(buf, "PNG")
    return buf.getvalue()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def run_level(url: str, route: str, image: bytes, concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    statuses: list[int] = []
    queue = asyncio.Queue()
    for _ in range(total):
        queue.put_nowait(None)

    async def worker(client: httpx.AsyncClient) -> None:
        while not queue.empty():
            queue.get_nowait()
            t0 = time.perf_counter()
            r = await client.post(url + route, content=image, headers={"content-type": "image/png"})
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status_code)

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    lat = sorted(latencies)
    return {"route": route, "concurrency": concurrency, "requests": total, "ok": statuses.count(200),
            "rps": total / elapsed, "p50_ms": statistics.median(lat) * 1e3,
            "p99_ms": lat[min(len(lat) - 1, int(0.99 * len(lat)))] * 1e3}


def in_process(image: bytes, batch: int, op: str, repeats: int = 3) -> tuple[float, float]:
    """(pipeline items/s, model-only items/s) for batches of `batch` copies of the image."""
    from service.outputs import render
    from service.inputs import Options
    from service.pipeline import preprocess
    from service.settings import Settings
    from service.worker.backends import LocalBackend
    from service.worker.jobs import Job

    settings = Settings(max_side=256)
    backend = LocalBackend(settings.model_spec)
    backend.start()
    items = [preprocess(image, Options(), settings.limits) for _ in range(batch)]
    jobs = [Job(i, op, batch=item.batch) for i, item in enumerate(items)]
    backend.run(jobs)  # warm-up
    model_t = min(_time(lambda: backend.run(jobs)) for _ in range(repeats))

    def pipeline() -> None:
        fresh = [preprocess(image, Options(), settings.limits) for _ in range(batch)]
        results = backend.run([Job(i, op, batch=it.batch) for i, it in enumerate(fresh)])
        if op == "reconstruct":
            for it, r in zip(fresh, results):
                render(it.kind, r.tubelets, it.batch.coords, it.media, None, "png")

    pipe_t = min(_time(pipeline) for _ in range(repeats))
    return batch / pipe_t, batch / model_t


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    parser.add_argument("--levels", nargs="+", type=int, default=[1, 8, 32])
    args = parser.parse_args()
    image = test_image()
    port = free_port()
    env = {**os.environ, "ATOKEN_MAX_SIDE": "256", "ATOKEN_MAX_WAIT_MS": "10", "ATOKEN_MAX_BATCH_TOKENS": "16384"}
    server = subprocess.Popen([sys.executable, "-m", "service", "serve", "--port", str(port)], cwd=ROOT, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/readyz").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("server did not become ready")
            time.sleep(0.2)
        rows = []
        for route, per_level in (("/encode", 64), ("/reconstruct", 48)):
            for level in args.levels:
                total = max(per_level, 2 * level)
                if level == 1:
                    total = per_level // 4
                row = asyncio.run(run_level(url, route, image, level, total))
                rows.append(row)
                print(f"{route:<12} c={level:>3} {row['rps']:7.2f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                      f"p99 {row['p99_ms']:7.1f} ms  ok {row['ok']}/{row['requests']}", flush=True)
    finally:
        server.terminate()
        server.wait(30)
    inproc = {}
    for op, route in (("embed", "/encode"), ("reconstruct", "/reconstruct")):
        for level in args.levels:
            inproc[(route, level)] = in_process(image, level, op)
            print(f"in-process {op:<11} batch {level:>3} pipeline {inproc[(route, level)][0]:7.2f} items/s  "
                  f"model only {inproc[(route, level)][1]:7.2f} items/s", flush=True)
    lines = ["# Service load test (CPU)", "",
             f"Machine: {describe()}. Model: the served default "
             "(see /info). Input: one 256x256 PNG (256 tokens) per request, raw body; loopback only, bounded "
             "request counts. Server: `python -m service serve` with the process worker, "
             "ATOKEN_MAX_WAIT_MS=10, ATOKEN_MAX_BATCH_TOKENS=16384. Generated by `make bench-service`.", "",
             "| route | concurrency | requests | ok | req/s | p50 ms | p99 ms | in-process pipeline items/s "
             "(batch = concurrency) | HTTP / in-process | in-process model only items/s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        pipe, model_only = inproc[(r["route"], r["concurrency"])]
        lines.append(f"| {r['route']} | {r['concurrency']} | {r['requests']} | {r['ok']} | {r['rps']:.2f} | "
                     f"{r['p50_ms']:.0f} | {r['p99_ms']:.0f} | {pipe:.2f} | {r['rps'] / pipe:.2f} | {model_only:.2f} |")
    for route in ("/encode", "/reconstruct"):
        one = next(r for r in rows if r["route"] == route and r["concurrency"] == min(args.levels))
        top = next(r for r in rows if r["route"] == route and r["concurrency"] == max(args.levels))
        lines.append(f"\n{route}: batching speed-up, concurrency {top['concurrency']} vs {one['concurrency']}: "
                     f"{top['rps'] / one['rps']:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
