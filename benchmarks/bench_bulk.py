"""Bulk tokenization throughput (`make bench-bulk`): the same images tokenized by
`tokenize-dataset` on the local engine, on the Ray engine (a local Ray instance on the same
cores), and through the HTTP API (`POST /tokenize`, one image a request) at the best of a few
client concurrencies. Items/s and tokens/s side by side; writes a markdown table."""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from service.bulk.run import RunConfig, tokenize_dataset  # noqa: E402
from service.settings import Settings  # noqa: E402
from tests import assets  # noqa: E402
from tests.service.process_server import ServerProcess  # noqa: E402

SOURCES = ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg", "camera.png", "hubble_deep_field.jpg")


def make_images(folder: Path, count: int, size: int) -> None:
    """`count` distinct PNGs: random crops of packaged photographs, resized to size x size."""
    rng = np.random.default_rng(0)
    photos = [np.asarray(Image.open(assets.image(n)).convert("RGB")) for n in SOURCES]
    for i in range(count):
        photo = photos[i % len(photos)]
        h, w = photo.shape[:2]
        side = int(rng.integers(min(h, w) // 2, min(h, w) + 1))
        y, x = int(rng.integers(0, h - side + 1)), int(rng.integers(0, w - side + 1))
        crop = Image.fromarray(photo[y:y + side, x:x + side]).resize((size, size), Image.BICUBIC)
        crop.save(folder / f"{i:05d}.png")


def run_engine(src: Path, engine: str, threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bulk-{engine}-"))
    try:
        start = time.perf_counter()
        summary = tokenize_dataset(RunConfig(str(src), str(out), shard_rows=250, engine=engine, threads=threads),
                                   Settings(variant=None))
        wall = time.perf_counter() - start
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "items": summary["items"], "tokens_per_s": summary["tokens_per_s"] * summary["seconds"] / wall}


def run_http(src: Path, concurrency: int, live: ServerProcess) -> dict:
    files = sorted(src.iterdir())
    tokens = 0

    def one(path: Path) -> int:
        with live.client(timeout=300) as c:
            r = c.post("/tokenize", files={"file": (path.name, path.read_bytes())})
        assert r.status_code == 200, r.text[:200]
        return r.json()["items"][0]["num_tokens"]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, files))
    wall = time.perf_counter() - start
    return {"wall_s": wall, "items": len(files), "tokens_per_s": tokens / wall}


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/benchmarks/bulk.md")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        make_images(src, args.images, args.size)
        results = {"local": run_engine(src, "local", threads)}
        print(f"local: {results['local']}", flush=True)
        results["ray"] = run_engine(src, "ray", threads)
        print(f"ray: {results['ray']}", flush=True)
        http = {}
        with ServerProcess(Path(tmp), variant="", jobs_dir=f"{tmp}/jobs") as live:
            for concurrency in (4, 16):
                http[concurrency] = run_http(src, concurrency, live)
                print(f"http x{concurrency}: {http[concurrency]}", flush=True)
        best = max(http, key=lambda c: http[c]["items"] / http[c]["wall_s"])
        results[f"http (concurrency {best})"] = http[best]
    write(args.out, results, args, threads)
    return 0


def write(path: str, results: dict, args, threads: int) -> None:
    local = results["local"]["items"] / results["local"]["wall_s"]
    lines = [
        "# Bulk tokenization: local engine, Ray engine, HTTP API",
        "",
        f"`make bench-bulk` on {platform.machine()}, {threads} cores, {time.strftime('%Y-%m-%d')}: "
        f"{args.images} distinct {args.size}x{args.size} PNGs (crops of packaged photographs), the shipped "
        "default model on the CPU, continuous tokens. Wall time includes loading the model (and, for Ray, "
        "starting a local Ray instance); HTTP is `POST /tokenize` one image a request from a thread pool, "
        "at the better of concurrency 4 and 16, against a running server.",
        "",
        "| path | wall time | items/s | tokens/s | vs local |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        rate = r["items"] / r["wall_s"]
        lines.append(f"| {name} | {r['wall_s']:.1f} s | {rate:.1f} | {r['tokens_per_s']:.0f} | {rate / local:.2f} |")
    lines += ["", "Goals: local at least 1.5x the HTTP path; Ray within 0.8x of local on one machine."]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
