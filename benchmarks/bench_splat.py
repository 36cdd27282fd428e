"""Splat compositing throughput: Gaussians x pixels per second.

    python benchmarks/bench_splat.py [--out docs/benchmarks/splat.md]

CPU: the PyTorch reference. GPU (when CUDA is present): the Triton kernel, and gsplat's CUDA
rasteriser on the same projected splats when gsplat is installed.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # benchmarks.machine

from benchmarks.machine import describe  # noqa: E402
from service.media.splat import project_gaussians, rasterize_reference, tile_intersections  # noqa: E402
from service.media.splat.preview import pixel_intrinsics  # noqa: E402


def scene(n: int, size: int, device: str):
    g = torch.Generator().manual_seed(0)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 0.8
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.01 + 0.003
    opac = torch.rand(n, generator=g) * 0.8 + 0.1
    colors = torch.rand(n, 3, generator=g)
    w2c = torch.eye(4)
    w2c[2, 3] = 2.0
    K = pixel_intrinsics(math.radians(40), size)
    p = project_gaussians(means, quats, scales, opac, w2c, K, size, size)
    off, ids = tile_intersections(p.means2d, p.radii, p.depths, size, size)
    to = lambda t: t.to(device)  # noqa: E731
    return (to(p.means2d), to(p.conics), to(colors), to(p.opacities), off, ids, size, size), len(ids)


def timed(fn, sync=lambda: None, runs=3) -> float:
    fn()
    sync()
    best = float("inf")
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    rows = []
    cases = [(20_000, 256), (74_368, 256), (74_368, 512)]
    for n, size in cases:
        a, pairs = scene(n, size, "cpu")
        sec = timed(lambda: rasterize_reference(*a), runs=2)
        rows.append(("torch reference (CPU)", n, size, pairs, sec))
        print(f"reference cpu  N={n:>6} {size}px  {sec * 1e3:8.1f} ms  {n * size * size / sec / 1e9:7.2f} G gauss*px/s",
              flush=True)
        if torch.cuda.is_available():
            from service.media.splat.triton_kernel import rasterize_triton

            g, _ = scene(n, size, "cuda")
            sec = timed(lambda: rasterize_triton(*g), torch.cuda.synchronize, runs=10)
            rows.append(("Triton kernel (GPU)", n, size, pairs, sec))
            try:
                import gsplat  # noqa: F401

                rows.append(("gsplat CUDA (GPU)", n, size, pairs, _gsplat_time(n, size)))
            except ImportError:
                print("gsplat not installed: no gsplat comparison")
    lines = ["# Splat compositing benchmark", "",
             f"Machine: {describe()}, torch {torch.__version__}"
             + (f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ", no GPU") + ".",
             "Projected splats of random scenes (scales 0.003-0.013, opacity 0.1-0.9), one 40-degree view. "
             "`G gauss*px/s` = Gaussians x pixels / time / 1e9 (the figure the issue asks for); "
             "`tile pairs` = (tile, Gaussian) intersections actually composited.", "",
             "| implementation | Gaussians | image | tile pairs | ms | G gauss*px/s |", "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for name, n, size, pairs, sec in rows:
        lines.append(f"| {name} | {n} | {size}x{size} | {pairs} | {sec * 1e3:.1f} | {n * size * size / sec / 1e9:.2f} |")
    if not torch.cuda.is_available():
        lines += ["", "No GPU on the machine that wrote this: the Triton kernel and gsplat were not timed "
                  "(run this script on a CUDA machine to add them)."]
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(lines) + "\n")
        print(f"wrote {args.out}")


def _gsplat_time(n: int, size: int) -> float:  # pragma: no cover - GPU only
    import gsplat

    g = torch.Generator().manual_seed(0)
    means = ((torch.rand(n, 3, generator=g) - 0.5) * 0.8).cuda()
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1).cuda()
    scales = (torch.rand(n, 3, generator=g) * 0.01 + 0.003).cuda()
    opac = (torch.rand(n, generator=g) * 0.8 + 0.1).cuda()
    colors = torch.rand(n, 3, generator=g).cuda()
    w2c = torch.eye(4, device="cuda")
    w2c[2, 3] = 2.0
    K = pixel_intrinsics(math.radians(40), size).cuda()
    fn = lambda: gsplat.rasterization(means, quats, scales, opac, colors, w2c[None], K[None], size, size)  # noqa: E731
    return timed(fn, torch.cuda.synchronize, runs=10)


if __name__ == "__main__":
    main()
