"""Tile-based splat compositing as a Triton kernel: one program per 16 x 16 tile, walking
that tile's splats front to back over all 256 pixels at once. Same signature and the same
rules as `rasterize_reference` (its oracle). Runs on CUDA tensors, or on CPU tensors under
TRITON_INTERPRET=1 (slow; for correctness tests)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from .reference import ALPHA_MAX, ALPHA_MIN, T_MIN
from .tiles import TILE


@triton.jit
def _composite_tile(
    means_ptr, conics_ptr, colors_ptr, opac_ptr, offsets_ptr, ids_ptr, out_ptr, alpha_ptr,
    width, height, tiles_x,
    C: tl.constexpr, TILE_SIZE: tl.constexpr, ALPHA_LO: tl.constexpr, ALPHA_HI: tl.constexpr,
    T_LO: tl.constexpr,
):
    tile = tl.program_id(0)
    ty = tile // tiles_x
    tx = tile % tiles_x
    local = tl.arange(0, TILE_SIZE * TILE_SIZE)
    px = tx * TILE_SIZE + local % TILE_SIZE
    py = ty * TILE_SIZE + local // TILE_SIZE
    fx = px.to(tl.float32) + 0.5
    fy = py.to(tl.float32) + 0.5
    inside = (px < width) & (py < height)
    start = tl.load(offsets_ptr + tile)
    end = tl.load(offsets_ptr + tile + 1)
    T = tl.full((TILE_SIZE * TILE_SIZE,), 1.0, tl.float32)
    active = inside
    acc_r = tl.zeros((TILE_SIZE * TILE_SIZE,), tl.float32)
    acc_g = tl.zeros((TILE_SIZE * TILE_SIZE,), tl.float32)
    acc_b = tl.zeros((TILE_SIZE * TILE_SIZE,), tl.float32)
    for k in range(start, end):
        g = tl.load(ids_ptr + k)
        mx = tl.load(means_ptr + 2 * g)
        my = tl.load(means_ptr + 2 * g + 1)
        ca = tl.load(conics_ptr + 3 * g)
        cb = tl.load(conics_ptr + 3 * g + 1)
        cc = tl.load(conics_ptr + 3 * g + 2)
        op = tl.load(opac_ptr + g)
        dx = fx - mx
        dy = fy - my
        power = -0.5 * (ca * dx * dx + cc * dy * dy) - cb * dx * dy
        alpha = tl.minimum(op * tl.exp(tl.minimum(power, 0.0)), ALPHA_HI)
        use = active & (power <= 0.0) & (alpha >= ALPHA_LO)
        alpha = tl.where(use, alpha, 0.0)
        next_T = T * (1.0 - alpha)
        crossing = use & (next_T < T_LO)
        active = active & ~crossing
        alpha = tl.where(crossing, 0.0, alpha)
        w = alpha * T
        acc_r += w * tl.load(colors_ptr + C * g)
        acc_g += w * tl.load(colors_ptr + C * g + 1)
        acc_b += w * tl.load(colors_ptr + C * g + 2)
        T = tl.where(crossing, T, T * (1.0 - alpha))
    pix = py * width + px
    tl.store(out_ptr + 3 * pix, acc_r, mask=inside)
    tl.store(out_ptr + 3 * pix + 1, acc_g, mask=inside)
    tl.store(out_ptr + 3 * pix + 2, acc_b, mask=inside)
    tl.store(alpha_ptr + pix, 1.0 - T, mask=inside)


def rasterize_triton(
    means2d: Tensor,  # [N, 2]
    conics: Tensor,  # [N, 3]
    colors: Tensor,  # [N, 3]
    opacities: Tensor,  # [N]
    tile_offsets: Tensor,  # [tiles + 1]
    gaussian_ids: Tensor,  # [M]
    width: int,
    height: int,
    background: Tensor | None = None,  # [3]
) -> tuple[Tensor, Tensor]:
    """-> (image [H, W, 3], alpha [H, W]); forward only."""
    if colors.shape[1] != 3:
        raise ValueError("the Triton kernel composites 3 colour channels")
    device = means2d.device
    f32 = lambda t: t.detach().to(device=device, dtype=torch.float32).contiguous()  # noqa: E731
    image = torch.zeros(height, width, 3, device=device, dtype=torch.float32)
    alpha = torch.zeros(height, width, device=device, dtype=torch.float32)
    tiles_x = -(-width // TILE)
    n_tiles = tiles_x * -(-height // TILE)
    _composite_tile[(n_tiles,)](
        f32(means2d), f32(conics), f32(colors), f32(opacities), tile_offsets.to(device).contiguous(),
        gaussian_ids.to(device).contiguous(), image, alpha, width, height, tiles_x,
        C=3, TILE_SIZE=TILE, ALPHA_LO=ALPHA_MIN, ALPHA_HI=ALPHA_MAX, T_LO=T_MIN,
    )
    if background is not None:
        image = image + (1 - alpha)[..., None] * background.to(device)
    return image, alpha
