"""Start an AToken from principal components, so training begins where the linear baseline
ends instead of at noise.

A pre-norm transformer with near-silent blocks is, up to its final norms, linear. The norms
remove each token's scale, which a patch's contrast lives in, so the stack carries a large
constant channel next to the signal: the norm then divides by (almost) that constant alone,
and the scale survives (relative error about (signal / constant)^2 / 2, under 1e-3 here).

Encoder: tubelet -> [s*c, -s*c, A, -A, small noise] -> post-norm -> proj -> c (the PCA
coefficients of frame 0), logvar = -10. Decoder: c -> [c, B (from the position table), ...]
-> out-norm -> out_layer -> mean + basis @ c, written to all 4 frames (a still tubelet, which
is also what frames 1-3 of an image are ignored as).

So that training starts exactly at the PCA reconstruction and can only move away from it by
improving on it, the blocks' output projections start at zero (as in ReZero / adaLN-Zero), and
the channels PCA does not use carry small random features whose read-out weights are zero:
they change nothing at the start, yet give every weight a gradient.
"""

from __future__ import annotations

import torch
from torch import nn

from ..autoencoder import AToken
from ..config import PATCH_SIZE
from .pca import TokenPCA

FRAME = PATCH_SIZE[1] * PATCH_SIZE[2] * 3  # 768 values of one frame of a tubelet
CONSTANT = 200.0  # the constant channel; coefficients are ~10, so the ratio is ~0.05
LOGVAR = -10.0
FREE_STD = 0.02  # random features in the channels PCA leaves free


@torch.no_grad()
def pca_warm_start(model: AToken, pca: TokenPCA) -> None:
    """Overwrite `model`'s stacks and projections with the PCA autoencoder of `pca` (tube=1)."""
    if pca.tube != 1:
        raise ValueError("the warm start uses per-frame patch components (tube=1)")
    basis = torch.from_numpy(pca.basis).float()  # [L, 768]
    mean = torch.from_numpy(pca.mean).float()  # [768]
    latent = model.cfg.latent_channels
    if basis.shape[0] != latent:
        raise ValueError(f"need {latent} components, got {basis.shape[0]}")
    _init_encoder(model, basis, mean)
    _init_decoder(model, basis, mean)


def _silent_blocks(stack: nn.Module) -> None:
    for block in stack.blocks:
        for out in (block.attn.to_out, block.mlp.mlp[2]):
            out.weight.zero_()
            if out.bias is not None:
                out.bias.zero_()


def _init_encoder(model: AToken, basis: torch.Tensor, mean: torch.Tensor) -> None:
    enc, latent = model.encoder, basis.shape[0]
    width = enc.cfg.model_channels
    if width < 2 * latent + 2:
        raise ValueError(f"encoder width {width} too small for a {latent}-channel warm start")
    w = enc.input_layer.weight  # [C, 3072]
    w.normal_(0, FREE_STD / 8)  # the inputs have 3072 entries: keep the free features ~0.1
    w[:2 * latent + 2] = 0
    w[:latent, :FRAME] = basis
    w[latent:2 * latent, :FRAME] = -basis
    constant = torch.zeros(width)
    constant[:latent], constant[latent:2 * latent] = -(basis @ mean), basis @ mean  # centre on the mean
    constant[2 * latent], constant[2 * latent + 1] = CONSTANT, -CONSTANT
    # The constant comes from the bias, or from the (position-independent) table if there is none.
    table = enc.pos_embedder.position_embedding.weight
    table.normal_(0, FREE_STD)
    table[:, :2 * latent + 2] = 0
    if enc.input_layer.bias is not None:
        enc.input_layer.bias.copy_(constant)
    else:
        table += constant
    _silent_blocks(enc)
    norm = enc.post_layernorm
    norm.weight.fill_(1.0)
    if getattr(norm, "bias", None) is not None:
        norm.bias.zero_()
    # After the norm a channel holds value / sigma, with sigma = CONSTANT * sqrt(2 / width).
    sigma = CONSTANT * (2 / width) ** 0.5
    proj = model.proj.weight  # [2L, C]
    proj.zero_()
    proj[:latent, :latent] = torch.eye(latent) * sigma
    proj[latent:, 2 * latent] = LOGVAR / (CONSTANT / sigma)


def _init_decoder(model: AToken, basis: torch.Tensor, mean: torch.Tensor) -> None:
    dec, latent = model.decoder, basis.shape[0]
    width = dec.cfg.model_channels
    if width < latent + 1:
        raise ValueError(f"decoder width {width} too small for a {latent}-channel warm start")
    w = dec.input_layer.weight  # [C, L]
    w.normal_(0, FREE_STD)
    w[:latent + 1] = 0
    w[:latent] = torch.eye(latent)
    if dec.input_layer.bias is not None:
        dec.input_layer.bias.zero_()
    table = dec.pos_embedder.position_embedding.weight
    table.normal_(0, FREE_STD)
    table[:, :latent + 1] = 0
    table[:, latent] = CONSTANT
    _silent_blocks(dec)
    dec.out_norm.weight.fill_(1.0)
    if getattr(dec.out_norm, "bias", None) is not None:
        dec.out_norm.bias.zero_()
    # RMS over the channels is ~CONSTANT / sqrt(width) (a LayerNorm would see the same spread
    # around its mean, to within the constant's own share).
    rms = CONSTANT / width**0.5
    frames = PATCH_SIZE[0]
    out = dec.out_layer.weight  # [3072, C]
    out.zero_()
    out[:, :latent] = basis.T.repeat(frames, 1) * rms
    out[:, latent] = mean.repeat(frames) * rms / CONSTANT
    if dec.out_layer.bias is not None:
        dec.out_layer.bias.zero_()
