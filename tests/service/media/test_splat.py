"""The splat rasteriser: reference invariants, and the Triton kernel against the reference
(on CPU under TRITON_INTERPRET=1; on CUDA when present)."""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from model.gaussians import Gaussians
from service.media.render import default_cameras
from service.media.splat import project_gaussians, rasterize_reference, render, tile_intersections
from model.metrics import psnr, ssim
from service.media.splat.preview import pixel_intrinsics, preview_grid, render_gaussian_views
from tests.conftest import ROOT


def scene(n=60, seed=0):
    g = torch.Generator().manual_seed(seed)
    means = (torch.rand(n, 3, generator=g) - 0.5) * 0.6
    quats = torch.nn.functional.normalize(torch.randn(n, 4, generator=g), dim=-1)
    scales = torch.rand(n, 3, generator=g) * 0.05 + 0.01
    opac = torch.rand(n, generator=g) * 0.8 + 0.1
    colors = torch.rand(n, 3, generator=g)
    w2c = torch.eye(4)
    w2c[2, 3] = 2.0
    K = pixel_intrinsics(math.radians(40), 48)
    return means, quats, scales, opac, colors, w2c, K


def test_single_isotropic_gaussian_has_its_centre_where_projected():
    means = torch.tensor([[0.1, -0.05, 0.0]])
    w2c = torch.eye(4)
    w2c[2, 3] = 2.0
    K = pixel_intrinsics(math.radians(40), 64)
    img, alpha = render(means, torch.tensor([[1.0, 0, 0, 0]]), torch.full((1, 3), 0.1), torch.tensor([0.9]),
                        torch.tensor([[1.0, 0.0, 0.0]]), w2c, K, 64, 64, filter_2d=0.0)
    peak = torch.nonzero(alpha == alpha.max())[0].tolist()
    fx = float(K[0, 0])
    expected = (32 + fx * 0.1 / 2 - 0.5, 32 - fx * 0.05 / 2 - 0.5)  # (x, y) pixel index of the centre
    assert abs(peak[1] - expected[0]) <= 1 and abs(peak[0] - expected[1]) <= 1
    assert float(alpha.max()) == pytest.approx(0.9, abs=0.02)
    assert torch.allclose(img[..., 1:], torch.zeros(()))


def test_front_splat_occludes_back_splat():
    means = torch.tensor([[0.0, 0.0, -0.2], [0.0, 0.0, 0.2]])  # first is nearer (camera at z=-2)
    w2c = torch.eye(4)
    w2c[2, 3] = 2.0
    K = pixel_intrinsics(math.radians(40), 32)
    colors = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    img, _ = render(means, torch.tensor([[1.0, 0, 0, 0]] * 2), torch.full((2, 3), 0.2), torch.tensor([0.99, 0.99]),
                    colors, w2c, K, 32, 32)
    centre = img[16, 16]
    assert centre[0] > 0.9 and centre[2] < 0.05


def test_reference_is_differentiable():
    means, quats, scales, opac, colors, w2c, K = scene(20)
    colors.requires_grad_(True)
    means.requires_grad_(True)
    img, _ = render(means, quats, scales, opac, colors, w2c, K, 48, 48)
    img.sum().backward()
    assert colors.grad.abs().sum() > 0 and means.grad.abs().sum() > 0


def test_bad_shapes_are_refused():
    means, quats, scales, opac, colors, w2c, K = scene(5)
    with pytest.raises(ValueError, match="quats"):
        render(means, quats[:, :3], scales, opac, colors, w2c, K, 16, 16)


TRITON_CHECK = r'''
import os, sys, torch
sys.path.insert(0, os.environ["ROOT"])
from tests.service.media.test_splat import scene
from service.media.splat import project_gaussians, rasterize_reference, tile_intersections
from service.media.splat.triton_kernel import rasterize_triton
worst = 0.0
for seed, (w, h) in enumerate([(48, 48), (40, 24), (33, 17)]):
    means, quats, scales, opac, colors, w2c, K = scene(40, seed)
    K[0, 2], K[1, 2] = w / 2, h / 2
    p = project_gaussians(means, quats, scales, opac, w2c, K, w, h)
    off, ids = tile_intersections(p.means2d, p.radii, p.depths, w, h)
    bg = torch.tensor([0.2, 0.3, 0.4])
    ref = rasterize_reference(p.means2d, p.conics, colors, p.opacities, off, ids, w, h, bg)
    out = rasterize_triton(p.means2d, p.conics, colors, p.opacities, off, ids, w, h, bg)
    for a, b in zip(out, ref):
        worst = max(worst, float((a - b).abs().max()))
print("max_abs_diff", worst)
'''


@pytest.mark.skipif(not __import__("importlib").util.find_spec("triton"), reason="triton not installed")
def test_triton_kernel_matches_reference_in_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1", "ROOT": str(ROOT)}
    proc = subprocess.run([sys.executable, "-c", TRITON_CHECK], capture_output=True, text=True, env=env,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    diff = float(proc.stdout.strip().split()[-1])
    assert diff < 1e-5, diff


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.gpu
def test_triton_kernel_matches_reference_on_gpu():
    from service.media.splat.triton_kernel import rasterize_triton

    means, quats, scales, opac, colors, w2c, K = scene(2000)
    p = project_gaussians(means, quats, scales, opac, w2c, K, 48, 48)
    off, ids = tile_intersections(p.means2d, p.radii, p.depths, 48, 48)
    ref = rasterize_reference(p.means2d, p.conics, colors, p.opacities, off, ids, 48, 48)
    cuda = lambda t: t.cuda()  # noqa: E731
    out = rasterize_triton(cuda(p.means2d), cuda(p.conics), cuda(colors), cuda(p.opacities), off, ids, 48, 48)
    assert (out[0].cpu() - ref[0]).abs().max() < 1e-4


def _gaussians_on_a_sphere(n=800):
    rng = np.random.default_rng(0)
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    xyz = torch.tensor(d * 0.3 + 0.5, dtype=torch.float32)
    colour = torch.tensor((d + 1) / 2, dtype=torch.float32)
    dc = ((colour - 0.5) / 0.28209479177387814)[:, None]
    return Gaussians(xyz, dc, torch.full((n, 3), 2.0), torch.full((n, 1), 3.0), torch.zeros(n, 4))


def test_previews_and_scores():
    g = _gaussians_on_a_sphere()
    grid = preview_grid(g, views=4, size=64)
    assert grid.shape == (128, 128, 3) and grid.max() > 100
    a = render_gaussian_views(g, default_cameras(2), 64)
    assert psnr(a, a) == float("inf") and ssim(a, a) == pytest.approx(1.0)
    noisy = np.clip(a.astype(int) + np.random.default_rng(1).integers(-40, 40, a.shape), 0, 255).astype(np.uint8)
    assert psnr(a, noisy) < 25 and ssim(a, noisy) < 0.9
