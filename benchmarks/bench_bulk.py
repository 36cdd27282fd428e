"""Bulk tokenization throughput (`make bench-bulk`): the same images tokenized by
`tokenize-dataset` on the local engine, on the Ray engine (a local Ray instance on the same
cores), and through the HTTP API (`POST /tokenize`, one image a request) at the best of a few
client concurrencies. Items/s and tokens/s side by side; writes a markdown table."""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.machine import cpu_ticks, describe, steal_pct, stolen_s  # noqa: E402
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


# The Ray engine measured twice: on a Ray instance already running (`ray start --head` on the
# same cores, as a cluster would be; started before the clock and stopped after it, the way the
# HTTP path is measured against a running server), and on a fresh local instance that the
# command starts and stops itself (what `--engine ray` does with no RAY_ADDRESS). A running
# cluster has served Ray Data jobs before: Ray Data's own service actors (its stats actor,
# autoscaling coordinator and, once a job has used an actor pool, its actor location tracker:
# all detached, so they outlive the job that started them) are up, so a tiny Ray Data job with
# an actor-pool stage runs before the clock. The fresh instance starts them within its run.
PATHS = ("local", "ray (running instance)", "ray (fresh instance)")
WARM_UP_JOB = """
import ray

class Identity:
    def __call__(self, batch):
        return batch

ray.init(address="auto")
ray.data.range(2).map_batches(Identity, compute=ray.data.ActorPoolStrategy(size=1)).materialize()
"""


def run_path(src: Path, path: str, threads: int) -> dict:
    if path == "local":
        return run_engine(src, "local", threads)
    if path == "ray (fresh instance)":
        return run_engine(src, "ray", threads)
    with running_ray(threads) as address:
        os.environ["RAY_ADDRESS"] = address
        try:
            return run_engine(src, "ray", threads)
        finally:
            del os.environ["RAY_ADDRESS"]


@contextmanager
def running_ray(cpus: int):
    ray = [str(Path(sys.executable).parent / "ray")]
    subprocess.run(ray + ["start", "--head", f"--num-cpus={cpus}", "--include-dashboard=false",
                          "--disable-usage-stats"], check=True, capture_output=True)
    try:
        subprocess.run([sys.executable, "-c", WARM_UP_JOB], check=True, capture_output=True)
        wait_idle()  # a cluster that is already up: its daemons and idle workers done starting
        yield "auto"
    finally:
        subprocess.run(ray + ["stop", "--force"], capture_output=True)


def wait_idle(fraction: float = 0.9, limit_s: float = 30.0) -> None:
    """Until the CPUs are idle `fraction` of a second (or limit_s passes)."""
    def idle_total() -> tuple[int, int]:
        ticks = cpu_ticks()
        return ticks[3] + ticks[4], sum(ticks)
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        i0, t0 = idle_total()
        time.sleep(1.0)
        i1, t1 = idle_total()
        if (i1 - i0) >= fraction * max(t1 - t0, 1):
            return


def run_engine(src: Path, engine: str, threads: int) -> dict:
    out = Path(tempfile.mkdtemp(prefix=f"bulk-{engine}-"))
    try:
        start, stolen = time.perf_counter(), stolen_s()
        summary = tokenize_dataset(RunConfig(str(src), str(out), shard_rows=250, engine=engine, threads=threads),
                                   Settings(variant=None))
        wall, stolen = time.perf_counter() - start, stolen_s() - stolen
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return {"wall_s": wall, "items": summary["items"], "tokens_per_s": summary["tokens_per_s"] * summary["seconds"] / wall,
            "steal_pct": steal_pct(stolen, wall)}


def run_http(files: list[Path], concurrency: int, live: ServerProcess) -> dict:
    local, clients = threading.local(), []  # one keep-alive client per thread, as a real client holds

    def one(path: Path) -> int:
        if not hasattr(local, "client"):
            local.client = live.client(timeout=300)
            clients.append(local.client)
        r = local.client.post("/tokenize", files={"file": (path.name, path.read_bytes())})
        assert r.status_code == 200, r.text[:200]
        return r.json()["items"][0]["num_tokens"]

    start, stolen = time.perf_counter(), stolen_s()
    with ThreadPoolExecutor(concurrency) as pool:
        tokens = sum(pool.map(one, files))
    wall, stolen = time.perf_counter() - start, stolen_s() - stolen
    for client in clients:
        client.close()
    return {"wall_s": wall, "items": len(files), "tokens_per_s": tokens / wall, "steal_pct": steal_pct(stolen, wall)}


@contextmanager
def turn(live: ServerProcess):
    """The server runs only in its turn: frozen (SIGSTOP, its whole process group) otherwise,
    so that it takes nothing from the paths measured beside it."""
    os.killpg(live.proc.pid, signal.SIGCONT)
    try:
        yield
    finally:
        os.killpg(live.proc.pid, signal.SIGSTOP)


def best_concurrency(files: list[Path], live: ServerProcess, sample: int = 300) -> tuple[int, dict]:
    """The client concurrency the HTTP path is measured at: the fastest on a sample."""
    rates = {}
    with turn(live):
        run_http(files[:32], 8, live)  # warm-up
        for concurrency in (4, 8, 16, 32):
            r = run_http(files[:sample], concurrency, live)
            rates[concurrency] = r["items"] / r["wall_s"]
    return max(rates, key=rates.get), rates


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default="docs/benchmarks/bulk.md")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5, help="runs of each path, in rotating order; medians")
    args = parser.parse_args()
    threads = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "images"
        src.mkdir()
        make_images(src, args.images, args.size)
        files = sorted(src.iterdir())
        with ServerProcess(Path(tmp), variant="", jobs_dir=f"{tmp}/jobs") as live:
            os.killpg(live.proc.pid, signal.SIGSTOP)
            concurrency, probe = best_concurrency(files, live)
            print(f"http concurrency {concurrency}: items/s on a sample {probe}", flush=True)
            http = f"http (concurrency {concurrency})"
            paths = PATHS + (http,)
            # Rounds in rotating order: this machine's speed drifts by 15-30% from minute to
            # minute, so a ratio is only fair between runs side by side.
            runs: dict[str, list[dict]] = {path: [] for path in paths}
            for round_ in range(args.rounds):
                for path in paths[round_ % len(paths):] + paths[:round_ % len(paths)]:
                    if path == http:
                        with turn(live):
                            runs[path].append(run_http(files, concurrency, live))
                    else:
                        runs[path].append(run_path(src, path, threads))
                    print(f"{path}: {runs[path][-1]}", flush=True)
            os.killpg(live.proc.pid, signal.SIGCONT)  # to stop
        results = {path: median_run(r) for path, r in runs.items()}
        for path in paths:
            results[path]["steal"] = [r["steal_pct"] for r in runs[path]]
        for path in paths[1:]:
            results[path]["rounds"] = [round(loc["wall_s"] / r["wall_s"], 2)
                                       for r, loc in zip(runs[path], runs["local"])]
        results[http]["probe"] = probe
    write(args.out, results, args)
    return 0


def median_run(runs: list[dict]) -> dict:
    """The run with the median wall time."""
    return dict(sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2])


def write(path: str, results: dict, args) -> None:
    local = results["local"]["items"] / results["local"]["wall_s"]
    lines = [
        "# Bulk tokenization: local engine, Ray engine, HTTP API",
        "",
        f"`make bench-bulk` on {describe()}, {time.strftime('%Y-%m-%d')}: "
        f"{args.images} distinct {args.size}x{args.size} PNGs (crops of packaged photographs), the shipped "
        "default model on the CPU, continuous tokens. Wall time includes loading the model, and for Ray "
        "its worker processes and actor; on a fresh instance also starting and stopping Ray itself. "
        "A running instance was started with `ray start --head` on the same cores before the clock, as the "
        "HTTP server was (a new one for each run, which had served one tiny Ray Data job with an actor-pool stage "
        "before the clock, as a cluster in use has: Ray Data's detached service actors were up; the fresh instance "
        "starts them in its run)."
        f" {args.rounds} rounds in rotating order, the HTTP path taking its turn among the others; the median "
        "run of each path is shown. HTTP is `POST /tokenize` one image a request from a thread pool (a "
        "keep-alive connection per thread) against a running server, frozen (SIGSTOP) outside its turns.",
        "",
        "| path | wall time | items/s | tokens/s | vs local |",
        "| --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        rate = r["items"] / r["wall_s"]
        lines.append(f"| {name} | {r['wall_s']:.1f} s | {rate:.1f} | {r['tokens_per_s']:.0f} | {rate / local:.2f} |")
    lines.append("")
    for name, r in list(results.items())[1:]:
        lines.append(f"{name} / local in each round: " + ", ".join(f"{x:.2f}" for x in r["rounds"]) + ".")
    http = next(name for name in results if name.startswith("http"))
    lines += ["", "local / HTTP in each round: " + ", ".join(f"{1 / x:.2f}" for x in results[http]["rounds"]) + ".",
              "The client concurrency was the fastest on a 300-image sample (items/s: "
              + ", ".join(f"{c}: {v:.1f}" for c, v in results[http]["probe"].items()) + ").",
              "", "CPU stolen by the hypervisor during each run, in each round (% of the machine's CPU; other "
              "guests' share of a virtual machine's cores, /proc/stat's steal: a run while more is stolen reads slower):",
              ""]
    lines += [f"- {name}: " + ", ".join(f"{x:.0f}" for x in r["steal"]) for name, r in results.items()]
    lines += ["", "Goals: local at least 1.5x the HTTP path; Ray within 0.8x of local on one machine."]
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("\n".join(lines) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
