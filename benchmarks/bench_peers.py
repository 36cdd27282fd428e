"""This service against a peer serving framework on the same model (`make bench-peers`).

    python benchmarks/bench_peers.py [--reps 3] [--out docs/benchmarks/peers.md]

Servers, one at a time, in an order that rotates every repetition (so drift of the machine
hits each alike):
  ours         `python -m service serve`, its defaults
  litserve-1   LitServe (benchmarks/peers/litserve_app.py), one inference worker
  litserve-2   the same with two inference workers
  ours-triton  (with --servers) our front end with the model in Triton Inference Server
and the same pipeline in-process (decode, model, encode; batches of the concurrency, cut to
the server's batch token cap). Each is sent the same 256x256 PNG as a multipart upload by the
same client, on /encode and /reconstruct at concurrency 1, 8 and 32. For every cell: req/s,
p50, the server's CPU ms per request (its process tree, from /proc), and the ratios per
repetition; medians in the table. First, both servers answer one request each and the
answers are compared (embeddings, PNG pixels)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import platform
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

from benchmarks.loadtest import test_image  # noqa: E402

ROUTES = {"/encode": "embed", "/reconstruct": "reconstruct"}
SERVERS = ("ours", "litserve-1", "litserve-2", "in-process", "ours-triton")
DEFAULT_SERVERS = SERVERS[:4]
RATIOS = (("ours", "litserve-1"), ("ours", "litserve-2"), ("ours", "in-process"), ("ours-triton", "ours"))
TICK = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tree_cpu_s(pid: int) -> float:
    """User + system CPU seconds of `pid` and every live descendant."""
    parents: dict[int, int] = {}
    times: dict[int, float] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry)] = int(stat[1])
        times[int(entry)] = (int(stat[11]) + int(stat[12])) / TICK
    members, frontier = {pid}, [pid]
    while frontier:
        p = frontier.pop()
        for child, parent in parents.items():
            if parent == p and child not in members:
                members.add(child)
                frontier.append(child)
    return sum(times.get(p, 0.0) for p in members)


class Server:
    def __init__(self, name: str):
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.triton = None
        env = dict(os.environ)
        if name == "ours-triton":  # our front end, the model in a real Triton Inference Server
            from service.triton_launch import TritonServer

            self.triton = TritonServer().start()
            grpc = env.get("ATOKEN_TRITON_PROTOCOL") == "grpc"
            env.update(ATOKEN_WORKER="triton",
                       ATOKEN_TRITON_URL=f"127.0.0.1:{self.triton.grpc_port}" if grpc else self.triton.url)
        if name.startswith("ours"):
            cmd, self.ready = [sys.executable, "-m", "service", "serve", "--port", str(self.port)], "/readyz"
        else:
            cmd = [sys.executable, "benchmarks/peers/litserve_app.py", "--port", str(self.port),
                   "--workers", name.rsplit("-", 1)[1]]
            self.ready = "/health"
        self.proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL, start_new_session=True)

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{self.name} exited with {self.proc.returncode}")
            try:
                r = httpx.get(self.url + self.ready, timeout=5)
                if r.status_code == 200 and (self.ready != "/health" or r.text.strip('"') == "ok"):
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise SystemExit(f"{self.name} not ready after {timeout} s")

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid) + (tree_cpu_s(self.triton.proc.pid) if self.triton else 0.0)

    def stop(self) -> None:
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        if self.triton:
            self.triton.stop()


async def drive(url: str, route: str, image: bytes, concurrency: int, total: int) -> dict:
    latencies: list[float] = []
    statuses: list[int] = []
    left = [total]

    async def worker(client: httpx.AsyncClient) -> None:
        while left[0] > 0:
            left[0] -= 1
            t0 = time.perf_counter()
            r = await client.post(url + route, files={"file": ("image.png", image, "image/png")})
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status_code)

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=300, limits=limits) as client:
        start = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    bad = [s for s in statuses if s != 200]
    if bad:
        raise SystemExit(f"{url}{route}: {len(bad)} of {total} requests failed (status {bad[0]})")
    return {"rps": total / elapsed, "p50_ms": statistics.median(latencies) * 1e3}


def total_for(route: str, concurrency: int) -> int:
    per = {"/encode": 24, "/reconstruct": 16}[route]
    return per if concurrency == 1 else max(4 * per, 3 * concurrency)


def measure_server(name: str, image: bytes, levels: list[int]) -> tuple[dict, dict]:
    """{(route, level): {rps, p50_ms, cpu_ms}} and the parity sample (embedding, png)."""
    server = Server(name)
    try:
        server.wait_ready()
        sample = {}
        with httpx.Client(timeout=300) as c:
            for route in ROUTES:
                r = c.post(server.url + route, files={"file": ("image.png", image, "image/png")})
                r.raise_for_status()
                sample[route] = r.json()["items"][0]["embedding"] if route == "/encode" else r.content
        cells = {}
        for route in ROUTES:
            asyncio.run(drive(server.url, route, image, max(levels), max(levels)))  # warm-up at full batch
            for level in levels:
                total = total_for(route, level)
                before = server.cpu_s()
                row = asyncio.run(drive(server.url, route, image, level, total))
                row["cpu_ms"] = (server.cpu_s() - before) / total * 1e3
                cells[(route, level)] = row
                print(f"  {name:<11} {route:<12} c={level:<3} {row['rps']:7.2f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                      f"cpu {row['cpu_ms']:6.1f} ms/req", flush=True)
        return cells, sample
    finally:
        server.stop()


def measure_in_process(image: bytes, levels: list[int]) -> dict:
    """The same stages in one thread: decode, model (batches cut to the server's token cap),
    encode the answer; items/s and this process's CPU ms per item."""
    from service.outputs import render
    from service.pipeline import Options, preprocess
    from service.settings import Settings
    from service.worker.backends import LocalBackend
    from service.worker.jobs import Job

    settings = Settings()
    backend = LocalBackend(settings.model_spec)
    backend.start()
    cells = {}
    model_cpu = [0.0]
    for route, op in ROUTES.items():
        def pipeline(n: int) -> None:
            items = [preprocess(image, Options(), settings.limits) for _ in range(n)]
            per_batch = max(1, settings.max_batch_tokens // items[0].batch.coords.shape[0])
            results = []
            for i in range(0, n, per_batch):
                c0 = time.process_time()  # every thread of this process: the lanes too
                results += backend.run([Job(k, op, batch=it.batch) for k, it in enumerate(items[i:i + per_batch])])
                model_cpu[0] += time.process_time() - c0
            for item, r in zip(items, results):
                if op == "reconstruct":
                    render(item.kind, r.tubelets, item.batch.coords, item.media, None, "png")
                else:
                    json.dumps({"embedding": r.embedding.numpy().astype(np.float32).tolist()})

        pipeline(max(levels))
        for level in levels:
            total = total_for(route, level)
            rounds = max(1, total // level)
            t0, c0 = time.perf_counter(), time.process_time()
            model_cpu[0] = 0.0
            for _ in range(rounds):
                pipeline(level)
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            cells[(route, level)] = {"rps": rounds * level / wall, "p50_ms": wall / rounds * 1e3,
                                     "cpu_ms": cpu / (rounds * level) * 1e3,
                                     "model_cpu_ms": model_cpu[0] / (rounds * level) * 1e3}
            print(f"  in-process  {route:<12} c={level:<3} {cells[(route, level)]['rps']:7.2f} items/s "
                  f"cpu {cells[(route, level)]['cpu_ms']:6.1f} ms/item", flush=True)
    backend.stop()
    return cells


def compare(a: dict, b: dict) -> dict:
    emb_a, emb_b = np.array(a["/encode"]), np.array(b["/encode"])
    png_a = np.asarray(Image.open(io.BytesIO(a["/reconstruct"])), dtype=np.int16)
    png_b = np.asarray(Image.open(io.BytesIO(b["/reconstruct"])), dtype=np.int16)
    return {"embedding_max_abs_diff": float(np.abs(emb_a - emb_b).max()),
            "png_bytes_equal": a["/reconstruct"] == b["/reconstruct"],
            "png_max_pixel_diff": int(np.abs(png_a - png_b).max())}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--servers", nargs="+", default=list(DEFAULT_SERVERS), choices=SERVERS)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/peers.md"))
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--before", type=Path, help="raw figures of an earlier run, shown beside these")
    args = parser.parse_args()
    image = test_image()
    runs: dict[str, list[dict]] = {name: [] for name in args.servers}
    samples: dict[str, dict] = {}
    failures: list[str] = []
    for rep in range(args.reps):
        order = args.servers[rep % len(args.servers):] + args.servers[:rep % len(args.servers)]
        print(f"repetition {rep + 1}/{args.reps}: {', '.join(order)}", flush=True)
        for name in order:
            if name == "in-process":
                runs[name].append(measure_in_process(image, args.levels))
            else:
                try:
                    cells, sample = measure_server(name, image, args.levels)
                except (Exception, SystemExit) as exc:  # noqa: BLE001 - one server failing must not lose the rest
                    print(f"  {name} failed in repetition {rep + 1}: {exc}", flush=True)
                    failures.append(f"{name}, repetition {rep + 1}: {exc}")
                    continue
                runs[name].append(cells)
                samples.setdefault(name, sample)
    parity = {name: compare(samples["ours"], s) for name, s in samples.items() if name != "ours" and "ours" in samples}
    raw = {"machine": f"{platform.machine()}, {os.cpu_count()} cores", "date": time.strftime("%Y-%m-%d"),
           "levels": args.levels, "parity": parity, "failures": failures,
           "runs": {n: [{f"{r} {lv}": v for (r, lv), v in cells.items()} for cells in rs] for n, rs in runs.items()}}
    if args.json:
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    before = json.loads(args.before.read_text()) if args.before else None
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(raw, before))
    print(f"wrote {args.out}")
    return 0


def _median(raw: dict, name: str, cell: str, key: str) -> float | None:
    values = [rep[cell][key] for rep in raw["runs"].get(name, []) if cell in rep]
    return statistics.median(values) if values else None


def _ratios(raw: dict, a: str, b: str, cell: str) -> list[float]:
    return [x[cell]["rps"] / y[cell]["rps"] for x, y in zip(raw["runs"].get(a, []), raw["runs"].get(b, []))]


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _outside(raw: dict, name: str, cell: str) -> float | None:
    pairs = [(x[cell]["cpu_ms"], y[cell].get("model_cpu_ms")) for x, y in
             zip(raw["runs"].get(name, []), raw["runs"].get("in-process", [])) if cell in x and cell in y]
    values = [a - b for a, b in pairs if b is not None]
    return statistics.median(values) if values else None


def _outside_table(raw: dict, before: dict | None) -> list[str]:
    # Ours only: the peer's model runs without lanes, so our in-process model cost is not its own.
    names = [n for n in ("ours", "ours-triton") if n in raw["runs"]]
    head = (["ours before"] if before else []) + names
    lines = ["| route | conc. | " + " | ".join(head) + " |", "| --- | ---: | " + " | ".join("---:" for _ in head) + " |"]
    for route in ROUTES:
        for level in raw["levels"]:
            cell = f"{route} {level}"
            row = ([_fmt(_outside(before, "ours", cell), ".1f")] if before else []) + \
                [_fmt(_outside(raw, n, cell), ".1f") for n in names]
            lines.append(f"| {route} | {level} | " + " | ".join(row) + " |")
    return lines


def report(raw: dict, before: dict | None) -> str:
    names = [n for n in SERVERS if n in raw["runs"]]
    reps = len(next(iter(raw["runs"].values())))
    lines = ["# Serving the same model: this service against LitServe", "",
             f"`make bench-peers` on {raw['machine']}, {raw['date']}; {reps} repetitions, servers in rotating order, "
             "medians (per-repetition ratios in brackets). One 256x256 PNG per request, multipart upload, "
             "same async client for every server, loopback; client, server and model share the cores. "
             "LitServe serves the same model through the same pre/post-processing code "
             "(`benchmarks/peers/litserve_app.py`; its recommended settings: max_batch_size 32, "
             "batch_timeout 10 ms, fast_queue). In-process: the same stages in one thread, no HTTP.", "",
             "## Throughput (requests/s)", "",
             "| route | conc. | " + " | ".join(names) + " | " + " | ".join(f"{a} / {b}" for a, b in RATIOS) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in names) + " | " + " | ".join("---" for _ in RATIOS) + " |"]
    for route in ROUTES:
        for level in raw["levels"]:
            cell = f"{route} {level}"
            row = [_fmt(_median(raw, n, cell, "rps")) for n in names]
            ratios = []
            for a, b in RATIOS:
                rs = _ratios(raw, a, b, cell)
                ratios.append(f"**{statistics.median(rs):.2f}** ({', '.join(f'{r:.2f}' for r in rs)})" if rs else "-")
            lines.append(f"| {route} | {level} | " + " | ".join(row) + " | " + " | ".join(ratios) + " |")
    lines += ["", "## Server CPU per request (ms, whole process tree) and p50 latency (ms)", "",
              "| route | conc. | " + " | ".join(f"{n} CPU" for n in names) + " | " + " | ".join(f"{n} p50" for n in names)
              + " |", "| --- | ---: | " + " | ".join("---:" for _ in names * 2) + " |"]
    for route in ROUTES:
        for level in raw["levels"]:
            cell = f"{route} {level}"
            lines.append(f"| {route} | {level} | " + " | ".join(_fmt(_median(raw, n, cell, "cpu_ms"), ".1f") for n in names)
                         + " | " + " | ".join(_fmt(_median(raw, n, cell, "p50_ms"), ".0f") for n in names) + " |")
    lines += ["", "## CPU per request outside the forward pass (ms)", "",
              "Server CPU per request minus the model's own CPU per item (measured in-process on the same "
              "batches, same repetition): HTTP, decoding, hand-off to the worker, encoding the answer.", ""]
    lines += _outside_table(raw, before)
    if raw.get("failures"):
        lines += ["", "## Failed runs", ""] + [f"- {f}" for f in raw["failures"]]
    if raw.get("parity"):
        lines += ["", "## Same answers", ""]
        for name, p in raw["parity"].items():
            lines.append(f"- ours vs {name}: embedding max |difference| {p['embedding_max_abs_diff']:.2e}; "
                         f"reconstruction PNG bytes {'identical' if p['png_bytes_equal'] else 'differ'} "
                         f"(max pixel difference {p['png_max_pixel_diff']}).")
    if before:
        lines += ["", f"## Before this work ({before['date']}, same bench)", "",
                  "| route | conc. | ours req/s before | after | ours CPU ms/req before | after | "
                  "ours / litserve-1 before | after |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for route in ROUTES:
            for level in raw["levels"]:
                cell = f"{route} {level}"
                rb, ra = _ratios(before, "ours", "litserve-1", cell), _ratios(raw, "ours", "litserve-1", cell)
                lines.append(f"| {route} | {level} | {_fmt(_median(before, 'ours', cell, 'rps'))} | "
                             f"{_fmt(_median(raw, 'ours', cell, 'rps'))} | {_fmt(_median(before, 'ours', cell, 'cpu_ms'), '.1f')} | "
                             f"{_fmt(_median(raw, 'ours', cell, 'cpu_ms'), '.1f')} | "
                             f"{_fmt(statistics.median(rb) if rb else None)} | {_fmt(statistics.median(ra) if ra else None)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
