"""This service against a peer serving framework on the same model (`make bench-peers`).

    python benchmarks/bench_peers.py [--reps 3] [--out docs/benchmarks/peers.md]

Servers, all started once and kept loaded:
  ours         `python -m service serve`, its defaults
  litserve-1   LitServe (benchmarks/peers/litserve_app.py), one inference worker
  litserve-2   the same with two inference workers
  ours-triton  (with --servers) our front end with the model in Triton Inference Server
and the same pipeline in-process (decode, model, encode; batches of the concurrency, cut to
the server's batch token cap). Each is sent the same 256x256 PNG (--size) as a multipart
upload by the same client, on /encode and /reconstruct at concurrency 1, 8 and 32
(--levels); --report writes a report from an earlier run's raw figures. The servers take turns
cell by cell (route and concurrency), in an order that rotates from cell to cell and from
repetition to repetition, so the ratios compare runs seconds apart rather than minutes: this
shared machine drifts by 20-30% over minutes. Within a cell each server runs several short
turns (--turns, 4), the servers alternating (A B B A ...), and the cell sums them: a slow
spell of a few seconds then falls on both sides of a ratio instead of on one (with one turn
of about 7 s each, ours-triton/ours at /encode concurrency 1 read 0.83 to 0.96 from one
repetition to the next). A server waiting for its turn is frozen (SIGSTOP, its whole process
tree), so it takes no CPU from the one measured; each turn starts with a short warm-up. For
every cell: req/s, p50, the server's CPU ms per request (its process tree, from /proc), the
CPU the hypervisor gave other guests meanwhile, and the ratios per repetition; medians in the
table. First, every server answers one request each and the answers are compared
(embeddings, PNG pixels)."""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.loadtest import test_image  # noqa: E402
from benchmarks.machine import TICK, describe, steal_pct, stolen_s  # noqa: E402

ROUTES = {"/encode": "embed", "/reconstruct": "reconstruct"}
SERVERS = ("ours", "litserve-1", "litserve-2", "in-process", "ours-triton")
DEFAULT_SERVERS = SERVERS[:4]
RATIOS = (("ours", "litserve-1"), ("ours", "litserve-2"), ("ours", "in-process"), ("ours-triton", "ours"))
RETRIES = 3  # measurements of a turn at most, past the first, while too much CPU is stolen


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree(pid: int) -> dict[int, float]:
    """CPU seconds (user + system) of `pid` and every live descendant, by pid."""
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
    return {p: times[p] for p in members if p in times}


def tree_cpu_s(pid: int) -> float:
    return sum(_tree(pid).values())


def _signal_tree(pid: int, sig: int) -> None:
    for p in _tree(pid):
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


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

    def freeze(self) -> None:
        """Stop every process of this server (front end first), so that it takes no CPU."""
        _signal_tree(self.proc.pid, signal.SIGSTOP)
        if self.triton:
            _signal_tree(self.triton.proc.pid, signal.SIGSTOP)

    def thaw(self) -> None:
        """Resume it, the model's side first: a front end must not find its worker stopped."""
        if self.triton:
            _signal_tree(self.triton.proc.pid, signal.SIGCONT)
        _signal_tree(self.proc.pid, signal.SIGCONT)

    def cpu_s(self) -> float:
        return tree_cpu_s(self.proc.pid) + (tree_cpu_s(self.triton.proc.pid) if self.triton else 0.0)

    def stop(self) -> None:
        self.thaw()
        os.killpg(self.proc.pid, 15)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)
            self.proc.wait(10)
        if self.triton:
            self.triton.stop()


async def drive(url: str, route: str, image: bytes, concurrency: int, total: int) -> dict:
    """`total` requests from `concurrency` keep-alive connections. aiohttp: on this 2-core machine
    the client shares the cores with the server, and httpx's async client took 1.2 ms of CPU per
    request where aiohttp takes 0.4 (docs/benchmarks/peers.md)."""
    latencies: list[float] = []
    statuses: list[int] = []
    left = [total]

    async def worker(session: aiohttp.ClientSession) -> None:
        while left[0] > 0:
            left[0] -= 1
            form = aiohttp.FormData()
            form.add_field("file", image, filename="image.png", content_type="image/png")
            t0 = time.perf_counter()
            async with session.post(url + route, data=form) as r:
                await r.read()
            latencies.append(time.perf_counter() - t0)
            statuses.append(r.status)

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=300)) as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    bad = [s for s in statuses if s != 200]
    if bad:
        raise SystemExit(f"{url}{route}: {len(bad)} of {total} requests failed (status {bad[0]})")
    return {"n": total, "wall_s": elapsed, "latencies_ms": [x * 1e3 for x in latencies]}


def total_for(route: str, concurrency: int) -> int:
    """Requests measured per cell: 2-4 s of work for this service, so that one scheduling
    hiccup on this shared machine moves a cell by a few percent, not by 20 (cells of about a
    second did: a third of the counts here, sized when the service was four times slower)."""
    per = {"/encode": 60, "/reconstruct": 40}[route]
    return 3 * per if concurrency == 1 else max(8 * per, 6 * concurrency)


def sample_answers(server: Server, image: bytes) -> dict:
    """One answer per route, for the parity check: the embedding and the PNG bytes."""
    sample = {}
    with httpx.Client(timeout=300) as c:
        for route in ROUTES:
            r = c.post(server.url + route, files={"file": ("image.png", image, "image/png")})
            r.raise_for_status()
            sample[route] = r.json()["items"][0]["embedding"] if route == "/encode" else r.content
    return sample


def measure_server_cell(server: Server, image: bytes, route: str, level: int, total: int) -> dict:
    """One turn on a thawed server: a warm-up at this concurrency, then `total` measured requests."""
    asyncio.run(drive(server.url, route, image, level, max(16, 2 * level)))
    before, client_before, stolen_before = server.cpu_s(), time.process_time(), stolen_s()
    row = asyncio.run(drive(server.url, route, image, level, total))
    row["cpu_s"] = server.cpu_s() - before
    row["client_cpu_s"] = time.process_time() - client_before
    row["stolen_s"] = stolen_s() - stolen_before
    return row


def merge_turns(turns: list[dict]) -> dict:
    """A cell's turns -> its row: requests over the turns' summed wall time, CPU per request,
    the median of every latency."""
    n = sum(t["n"] for t in turns)
    row = {"rps": n / sum(t["wall_s"] for t in turns),
           "p50_ms": statistics.median([x for t in turns for x in t["latencies_ms"]])}
    for key in ("cpu", "client_cpu", "model_cpu"):
        if all(f"{key}_s" in t for t in turns):
            row[f"{key}_ms"] = sum(t[f"{key}_s"] for t in turns) / n * 1e3
    row["steal_pct"] = turns_steal_pct(turns)
    return row


class InProcess:
    """The same stages in one thread: decode, model (batches cut to the server's token cap),
    encode the answer; items/s and this process's CPU ms per item."""

    def __init__(self):
        from service.settings import Settings
        from service.worker.backends import LocalBackend

        self.settings = Settings()
        self.backend = LocalBackend(self.settings.model_spec)
        self.backend.start()

    def _pipeline(self, image: bytes, op: str, n: int) -> float:
        """Runs n items; returns the model's CPU seconds (every thread of this process: lanes too)."""
        from service.arrays import finite_list
        from service.outputs import render_image
        from service.inputs import Options
        from service.responses import render_json
        from service.pipeline import preprocess
        from service.worker.jobs import Job

        items = [preprocess(image, Options(), self.settings.limits) for _ in range(n)]
        per_batch = max(1, self.settings.max_batch_tokens // Job(0, op, batch=items[0].batch).cost)
        results, model_cpu = [], 0.0
        for i in range(0, n, per_batch):  # the jobs the server's routes make, in its batches
            c0 = time.process_time()
            results += self.backend.run([Job(k, op, batch=it.batch, pixels=True)
                                         for k, it in enumerate(items[i:i + per_batch])])
            model_cpu += time.process_time() - c0
        for item, r in zip(items, results):
            if op == "reconstruct":  # the file and its round-trip score, as /reconstruct answers
                render_image(item, r, "png")
            else:
                render_json({"embedding": finite_list(r.embedding.numpy().astype(np.float32), "the embedding")})
        return model_cpu

    def cell(self, image: bytes, route: str, level: int, total: int) -> dict:
        """One turn: a warm-up, then batches of `level` items, about `total` in all; the latency
        counted is a batch's time (the whole of it, as for a request of a full batch)."""
        op = ROUTES[route]
        self._pipeline(image, op, level)  # warm-up
        rounds = max(1, total // level)
        t0, c0, s0 = time.perf_counter(), time.process_time(), stolen_s()
        model_cpu = sum(self._pipeline(image, op, level) for _ in range(rounds))
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        return {"n": rounds * level, "wall_s": wall, "latencies_ms": [wall / rounds * 1e3] * rounds,
                "cpu_s": cpu, "model_cpu_s": model_cpu, "stolen_s": stolen_s() - s0}

    def stop(self) -> None:
        self.backend.stop()


def start_servers(names: list[str], image: bytes, failures: list[str]) -> tuple[dict, dict]:
    """Every server started, checked, sampled and frozen; those that fail are reported and left out."""
    running, samples = {}, {}
    for name in names:
        if name == "in-process":
            running[name] = InProcess()
            continue
        server = None
        try:
            server = Server(name)
            server.wait_ready()
            samples[name] = sample_answers(server, image)
            for route in ROUTES:  # the first batches at full size are slow: not part of any cell
                asyncio.run(drive(server.url, route, image, 32, 32))
            server.freeze()
            running[name] = server
        except (Exception, SystemExit) as exc:  # noqa: BLE001 - one server failing must not lose the rest
            print(f"  {name} failed to start: {exc}", flush=True)
            failures.append(f"{name}, start: {exc}")
            if server is not None:
                server.stop()
    return running, samples


def measure_turn(name: str, runner, image: bytes, route: str, level: int, total: int) -> dict:
    if name == "in-process":
        return runner.cell(image, route, level, total)
    runner.thaw()
    try:
        return measure_server_cell(runner, image, route, level, total)
    finally:
        runner.freeze()


def turns_steal_pct(turns: list[dict]) -> float:
    """The share of the machine's CPU the hypervisor took while `turns` ran."""
    return steal_pct(sum(t["stolen_s"] for t in turns), sum(t["wall_s"] for t in turns))


def measure_cells(names: list[str], running: dict, image: bytes, route: str, level: int, turns: int,
                  failures: list[str], rep: int, max_steal: float | None = None) -> dict[str, dict]:
    """One cell for every server: `turns` turns each, the servers alternating, in the order
    `names` gives; a server that fails a turn is left out of the cell. A turn during which the
    hypervisor took more than `max_steal` % of the CPU is measured again, up to RETRIES times
    (the last one counts), for every server alike."""
    total = max(level, total_for(route, level) // turns)
    got: dict[str, list[dict]] = {name: [] for name in names}
    retried = {name: 0 for name in names}
    for turn in range(turns):
        for name in (names if turn % 2 == 0 else names[::-1]):
            if got[name] is None:
                continue
            try:
                for attempt in range(RETRIES + 1):
                    row = measure_turn(name, running[name], image, route, level, total)
                    if max_steal is None or turns_steal_pct([row]) <= max_steal or attempt == RETRIES:
                        break
                    retried[name] += 1
                got[name].append(row)
            except (Exception, SystemExit) as exc:  # noqa: BLE001
                print(f"  {name} failed on {route} c={level}: {exc}", flush=True)
                failures.append(f"{name}, repetition {rep + 1}, {route} c={level}: {exc}")
                got[name] = None
    return {name: {**merge_turns(t), "retried_turns": retried[name], "turns": len(t)} for name, t in got.items() if t}


def compare(a: dict, b: dict) -> dict:
    emb_a, emb_b = np.array(a["/encode"]), np.array(b["/encode"])
    png_a = np.asarray(Image.open(io.BytesIO(a["/reconstruct"])), dtype=np.int16)
    png_b = np.asarray(Image.open(io.BytesIO(b["/reconstruct"])), dtype=np.int16)
    return {"embedding_max_abs_diff": float(np.abs(emb_a - emb_b).max()),
            "png_bytes_equal": a["/reconstruct"] == b["/reconstruct"],
            "png_max_pixel_diff": int(np.abs(png_a - png_b).max())}


def _side(text: str) -> int:
    """--size: a whole number of 16-pixel patches, within the side the servers take (ATOKEN_MAX_SIDE,
    read from this environment, which they inherit): larger, every request would be refused."""
    from service.settings import Settings

    side, most = int(text), Settings().max_side
    if not 16 <= side <= most or side % 16:
        raise argparse.ArgumentTypeError(f"{side} is not a multiple of 16 from 16 to {most} (ATOKEN_MAX_SIDE)")
    return side


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--levels", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--servers", nargs="+", default=list(DEFAULT_SERVERS), choices=SERVERS)
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/peers.md"))
    parser.add_argument("--json", type=Path, help="also write the raw figures here")
    parser.add_argument("--size", type=_side, default=256,
                        help="side of the square PNG sent (128: a quarter of the model's work per request, "
                             "which shows on a slow CPU what fixed costs weigh on faster hardware)")
    parser.add_argument("--before", type=Path, help="raw figures of an earlier run, shown beside these")
    parser.add_argument("--turns", type=int, default=4,
                        help="turns per server and cell, the servers alternating; the cell's requests split between them")
    parser.add_argument("--max-steal", type=float, default=None,
                        help=f"measure a turn again (up to {RETRIES} times) when the hypervisor took more than this "
                             "%% of the CPU during it")
    parser.add_argument("--report", type=Path, metavar="RAW_JSON",
                        help="measure nothing: write --out from the raw figures of an earlier run (its --json)")
    args = parser.parse_args()
    before = json.loads(args.before.read_text()) if args.before else None
    raw = json.loads(args.report.read_text()) if args.report else measure(args)
    if args.json and not args.report:
        args.json.write_text(json.dumps(raw, indent=1) + "\n")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report(raw, before))
    print(f"wrote {args.out}")
    return 0


def measure(args: argparse.Namespace) -> dict:
    """Every server in every cell, `args.reps` times: the raw figures."""
    image = test_image(args.size)
    failures: list[str] = []
    running, samples = start_servers(args.servers, image, failures)
    names = [n for n in args.servers if n in running]
    runs: dict[str, list[dict]] = {name: [{} for _ in range(args.reps)] for name in names}
    cells = [(route, level) for route in ROUTES for level in args.levels]
    try:
        for rep in range(args.reps):
            print(f"repetition {rep + 1}/{args.reps}", flush=True)
            for c, (route, level) in enumerate(cells):
                shift = (rep + c) % len(names)
                rows = measure_cells(names[shift:] + names[:shift], running, image, route, level, args.turns,
                                     failures, rep, args.max_steal)
                for name, row in rows.items():
                    runs[name][rep][(route, level)] = row
                    print(f"  {name:<11} {route:<12} c={level:<3} {row['rps']:7.2f} req/s  p50 {row['p50_ms']:7.1f} ms  "
                          f"cpu {row['cpu_ms']:6.1f} ms/req", flush=True)
    finally:
        for runner in running.values():
            runner.stop()
    parity = {name: compare(samples["ours"], s) for name, s in samples.items() if name != "ours" and "ours" in samples}
    return {"machine": describe(), "date": time.strftime("%Y-%m-%d"), "size": args.size,
            "levels": args.levels, "turns": args.turns, "max_steal": args.max_steal, "parity": parity, "failures": failures,
            "runs": {n: [{f"{r} {lv}": v for (r, lv), v in per_rep.items()} for per_rep in rs] for n, rs in runs.items()}}


def _median(raw: dict, name: str, cell: str, key: str) -> float | None:
    values = [rep[cell][key] for rep in raw["runs"].get(name, []) if cell in rep]
    return statistics.median(values) if values else None


def _ratios(raw: dict, a: str, b: str, cell: str) -> list[float]:
    return [x[cell]["rps"] / y[cell]["rps"] for x, y in zip(raw["runs"].get(a, []), raw["runs"].get(b, []))
            if cell in x and cell in y]


def _retried(raw: dict) -> str:
    rows = [row for rs in raw["runs"].values() for rep in rs for row in rep.values()]
    return f"{sum(r.get('retried_turns', 0) for r in rows)} measurements again for {sum(r.get('turns', 0) for r in rows)} turns"


def _steal(raw: dict, name: str, cell: str) -> str:
    values = [rep[cell]["steal_pct"] for rep in raw["runs"].get(name, []) if "steal_pct" in rep.get(cell, {})]
    if not values:
        return "-"
    return f"{statistics.median(values):.0f} ({', '.join(f'{v:.0f}' for v in values)})"


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
    ratios = [(a, b) for a, b in RATIOS if a in names and b in names]  # only the pairs this run measured
    reps = len(next(iter(raw["runs"].values())))
    litserve, triton_pair = any(n.startswith("litserve") for n in names), names == ["ours", "ours-triton"]
    title = ("this service against LitServe" if litserve else
             "Triton mode against the process worker" if triton_pair else ", ".join(names))
    command = ("make bench-peers" if litserve else "make bench-triton" if triton_pair
               else "benchmarks/bench_peers.py --servers " + " ".join(names))
    size = raw.get("size", 256)  # raw figures written before the option read 256
    if size != 256:  # not what the make targets run
        command = f"benchmarks/bench_peers.py --servers {' '.join(names)} --size {size}"
    lines = [f"# Serving the same model: {title}", "",
             f"`{command}` on {raw['machine']}, {raw['date']}; {reps} repetitions; all servers loaded, "
             "taking turns cell by cell in rotating order (a server waiting its turn is frozen with SIGSTOP), "
             f"medians (per-repetition ratios in brackets). One {size}x{size} PNG per request, multipart upload, "
             f"{total_for('/encode', 1)} (/encode) or {total_for('/reconstruct', 1)} (/reconstruct) requests per "
             f"cell at concurrency 1, {total_for('/encode', 8)} or {total_for('/reconstruct', 8)} at 8 and 32, "
             "after a warm-up; "
             "same async client (aiohttp) for every server, loopback; client, server and model share the cores."
             + (" LitServe serves the same model through the same pre/post-processing code "
                "(`benchmarks/peers/litserve_app.py`; its recommended settings: max_batch_size 32, "
                "batch_timeout 10 ms, fast_queue)." if litserve else "")
             + (" In-process: the same stages in one thread, no HTTP." if "in-process" in names else ""), "",
             "## Throughput (requests/s)", "",
             "| route | conc. | " + " | ".join(names) + " | " + " | ".join(f"{a} / {b}" for a, b in ratios) + " |",
             "| --- | ---: | " + " | ".join("---:" for _ in names) + " | " + " | ".join("---" for _ in ratios) + " |"]
    for route in ROUTES:
        for level in raw["levels"]:
            cell = f"{route} {level}"
            row = [_fmt(_median(raw, n, cell, "rps")) for n in names]
            shown = []
            for a, b in ratios:
                rs = _ratios(raw, a, b, cell)
                shown.append(f"**{statistics.median(rs):.2f}** ({', '.join(f'{r:.2f}' for r in rs)})" if rs else "-")
            lines.append(f"| {route} | {level} | " + " | ".join(row) + " | " + " | ".join(shown) + " |")
    lines += ["", "## Server CPU per request (ms, whole process tree) and p50 latency (ms)", "",
              "| route | conc. | " + " | ".join(f"{n} CPU" for n in names) + " | " + " | ".join(f"{n} p50" for n in names)
              + " |", "| --- | ---: | " + " | ".join("---:" for _ in names * 2) + " |"]
    for route in ROUTES:
        for level in raw["levels"]:
            cell = f"{route} {level}"
            lines.append(f"| {route} | {level} | " + " | ".join(_fmt(_median(raw, n, cell, "cpu_ms"), ".1f") for n in names)
                         + " | " + " | ".join(_fmt(_median(raw, n, cell, "p50_ms"), ".0f") for n in names) + " |")
    if any("steal_pct" in row for rs in raw["runs"].values() for rep in rs for row in rep.values()):
        lines += ["", "## CPU stolen by the hypervisor (% of the machine's CPU while each server was measured)", "",
                  "Other guests' share of this VM's cores (/proc/stat's steal), median of the repetitions "
                  "(per repetition in brackets). A server measured while more was stolen reads slower; turns "
                  "alternating within a cell share out what is stolen, but not evenly."
                  + (f" A turn during which more than {raw['max_steal']:g}% was stolen was measured again, up to "
                     f"{RETRIES} times, the last counting: {_retried(raw)}." if raw.get("max_steal") is not None else ""),
                  "",
                  "| route | conc. | " + " | ".join(names) + " |", "| --- | ---: | " + " | ".join("---" for _ in names) + " |"]
        for route in ROUTES:
            for level in raw["levels"]:
                cell = f"{route} {level}"
                lines.append(f"| {route} | {level} | " + " | ".join(_steal(raw, n, cell) for n in names) + " |")
    client = [(cell, _median(raw, "ours", cell, "client_cpu_ms")) for cell in
              (f"{route} {level}" for route in ROUTES for level in raw["levels"])]
    if all(v is not None for _, v in client):
        lines += ["", "The client's own CPU per request, against ours (it shares the cores"
                  + ("; in-process has none" if "in-process" in names else "") + "): "
                  + ", ".join(f"{cell} {v:.2f} ms" for cell, v in client) + "."]
    if "in-process" in names:  # the model's own CPU is measured there
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
        # The server the work changed, and the ratio that judges it.
        a, b = ("ours-triton", "ours") if triton_pair else ("ours", "litserve-1")
        lines += ["", f"## Before this work ({before['date']}, same bench)", "",
                  f"| route | conc. | {a} req/s before | after | {a} CPU ms/req before | after | "
                  f"{a} / {b} before | after |", "| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |"]
        for route in ROUTES:
            for level in raw["levels"]:
                cell = f"{route} {level}"
                rb, ra = _ratios(before, a, b, cell), _ratios(raw, a, b, cell)
                lines.append(f"| {route} | {level} | {_fmt(_median(before, a, cell, 'rps'))} | "
                             f"{_fmt(_median(raw, a, cell, 'rps'))} | {_fmt(_median(before, a, cell, 'cpu_ms'), '.1f')} | "
                             f"{_fmt(_median(raw, a, cell, 'cpu_ms'), '.1f')} | "
                             f"{_fmt(statistics.median(rb) if rb else None)} | {_fmt(statistics.median(ra) if ra else None)} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
