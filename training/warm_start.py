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

The blocks must also *see* the signal. Behind their pre-norms the constant channel dominates
(about 11 against coefficients of 0.01-0.5), so at the default gains every block input is
nearly the same vector: attention is uniform, the MLPs sit in their linear range, and training
cannot get past the linear code it started from. The blocks' norm gains therefore whiten the
coefficients (gain = norm scale / coefficient std) and shut the constant channels out (gain 0).
Their outputs still start at zero, so the model's function is unchanged.

With a `ContextDecoder` (context.py) the decoder starts one step past PCA: the first blocks'
attention heads each fetch one neighbour's coefficients (queries and keys come from the constant
channel alone, phased so that the 4D RoPE score peaks at that neighbour's offset, and sharp
enough that the neighbour gets all but ~1e-6 of the weight; at a border the token itself wins,
which is the replicated edge the fit assumed), write the neighbour terms of the least-squares
fit into `rank` channels, and the read-out adds them to the PCA reconstruction.
"""

from __future__ import annotations

import torch
from torch import nn

from model.autoencoder import AToken
from model.config import PATCH_SIZE
from .context import OFFSETS, ContextDecoder
from .pca import TokenPCA

FRAME = PATCH_SIZE[1] * PATCH_SIZE[2] * 3  # 768 values of one frame of a tubelet
CONSTANT = 200.0  # the constant channel; coefficients are ~10, so the ratio is ~0.05
LOGVAR = -10.0
FREE_STD = 0.02  # random features in the channels PCA leaves free
HEAD_GAIN = 6.0  # q/k gain of a neighbour head: a logit gap of ~15 to the next-best token


@torch.no_grad()
def pca_warm_start(model: AToken, pca: TokenPCA, context: ContextDecoder | None = None) -> None:
    """Overwrite `model`'s stacks and projections with the PCA autoencoder of `pca` (tube=1),
    decoded with neighbour context if `context` is given."""
    if pca.tube != 1:
        raise ValueError("the warm start uses per-frame patch components (tube=1)")
    basis = torch.from_numpy(pca.basis).float()  # [L, 768]
    mean = torch.from_numpy(pca.mean).float()  # [768]
    latent = model.cfg.latent_channels
    if basis.shape[0] != latent:
        raise ValueError(f"need {latent} components, got {basis.shape[0]}")
    _init_encoder(model, basis, mean)
    _init_decoder(model, basis, mean)
    scales = torch.from_numpy(pca.scales).float().clamp_min(1e-3)  # [L]
    enc_width, dec_width = model.encoder.cfg.model_channels, model.decoder.cfg.model_channels
    _open_block_inputs(model.encoder, scales, CONSTANT * (2 / enc_width) ** 0.5, shut=range(latent, 2 * latent + 2))
    rms = CONSTANT / dec_width**0.5
    gain = _open_block_inputs(model.decoder, scales, rms, shut=[latent])
    if context is not None:
        _add_context(model, context, gain, rms)


def _open_block_inputs(stack: nn.Module, scales: torch.Tensor, norm_scale: float, shut) -> torch.Tensor:
    """Gains of every block's pre-norms: coefficient k (channel k) whitened, channels `shut`
    (the constant and the mirrored copy) zeroed, the free channels left at 1."""
    gain = torch.ones(stack.cfg.model_channels)
    gain[: len(scales)] = norm_scale / scales
    gain[list(shut)] = 0.0
    for block in stack.blocks:
        for norm in (block.norm1, block.norm2):
            norm.weight.copy_(gain)
    return gain


def context_parameters(model: AToken) -> tuple[str, ...]:
    """Name prefixes of the attention layers that hold the neighbour heads: part of the warm
    start's linear path, so a trainer may give them the small learning rate of the other IO layers."""
    per_block = model.decoder.cfg.num_heads
    return tuple(f"decoder.blocks.{b}.attn." for b in range(-(-len(OFFSETS) // per_block)))


def _neighbour_query_key(head_dim: int, offset: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Unit query and key [head_dim] whose RoPE score peaks at a key `offset` (row, column) away
    in the same t and z: pair j turns by pos[j // n] * freq(j % n) (model.layers.rope)."""
    n = head_dim // 8
    freqs = 10000.0 ** (-torch.arange(n, dtype=torch.float64) / head_dim)
    shift = torch.tensor([0.0, offset[0], offset[1], 0.0], dtype=torch.float64)  # (t, x=row, y=column, z)
    angle = (shift[:, None] * freqs[None]).reshape(-1)  # [head_dim/2]
    q = torch.stack((angle.cos(), angle.sin()), -1).reshape(-1)
    k = torch.stack((torch.ones_like(angle), torch.zeros_like(angle)), -1).reshape(-1)
    return (q / q.norm()).float(), (k / k.norm()).float()


def _add_context(model: AToken, context: ContextDecoder, gain: torch.Tensor, rms: float) -> None:
    dec, latent = model.decoder, model.cfg.latent_channels
    cfg, width = dec.cfg, dec.cfg.model_channels
    rank = len(context.directions)
    heads = [(b, h) for b in range(cfg.num_blocks) for h in range(cfg.num_heads)][: len(OFFSETS)]
    if len(heads) < len(OFFSETS) or cfg.head_dim < latent or not cfg.qk_rms_norm or width < latent + 1 + rank:
        raise ValueError("the decoder is too small for a context warm start (8 heads of >= latent channels, "
                         "qk-norm, latent + 1 + rank channels)")
    ctx = slice(latent + 1, latent + 1 + rank)
    directions = torch.from_numpy(context.directions).float()  # [r, 768]
    # The context channels start clean: no random features, and whitened where blocks read them.
    dec.input_layer.weight[ctx] = 0
    dec.pos_embedder.position_embedding.weight[:, ctx] = 0
    # Whitened up to the coefficients' largest gain: the faint directions (std ~1e-3) would
    # otherwise amplify any stray write ~1e3-fold into every later block's input.
    gain[ctx] = (rms / torch.from_numpy(context.scales).float()).clamp_max(float(gain[:latent].max()))
    for block in dec.blocks:
        block.norm1.weight[ctx] = gain[ctx]
        block.norm2.weight[ctx] = gain[ctx]
    d = cfg.head_dim
    for b in {b for b, _ in heads}:
        attn = dec.blocks[b].attn
        dec.blocks[b].norm1.weight[latent] = 1.0  # the heads' queries and keys come from the constant
        attn.to_qkv.weight.zero_()
    for (b, h), offset, maps in zip(heads, OFFSETS, context.neighbours):
        attn, norm = dec.blocks[b].attn, dec.blocks[b].norm1
        q, k = _neighbour_query_key(d, offset)
        attn.to_qkv.weight[h * d:(h + 1) * d, latent] = q
        attn.to_qkv.weight[width + h * d:width + (h + 1) * d, latent] = k
        attn.q_rms_norm.gamma[h] = HEAD_GAIN
        attn.k_rms_norm.gamma[h] = HEAD_GAIN
        v = slice(2 * width + h * d, 2 * width + h * d + latent)
        attn.to_qkv.weight[v, :latent] = torch.diag(rms / norm.weight[:latent])  # v = the coefficients
        attn.to_out.weight[ctx, h * d:h * d + latent] = (torch.from_numpy(maps).float() @ directions.T).T
    frames = PATCH_SIZE[0]
    out = dec.out_layer.weight  # [3072, C]
    out[:, :latent] += torch.from_numpy(context.centre).float().T.repeat(frames, 1) * rms
    out[:, latent] += torch.from_numpy(context.bias).float().repeat(frames) * rms / CONSTANT
    out[:, ctx] = directions.T.repeat(frames, 1) * rms


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


FSQ_SPREAD = 1.3  # latent std -> ~1 step of the 4-level quantizer (near-optimal for a Gaussian)


@torch.no_grad()
def fsq_warm_start(model: AToken, latent_std: torch.Tensor) -> None:
    """Rescale a continuous model for its quantizer (curriculum stage 4 starts here): each latent
    channel is divided by FSQ_SPREAD * its std, so the bounded values span the levels, and the
    decoder's input multiplies it back (codes ~ bounded / half-width ~ 2/3 of the scaled latent
    near zero, where tanh is about linear). latent_std: [L], measured on training data."""
    if model.quantizer is None:
        raise ValueError("the model has no quantizer (use an FSQ variant such as tiny-d)")
    latent, groups = model.cfg.latent_channels, model.quantizer.cfg.num_codebooks
    half_width = (model.quantizer.levels // 2).repeat(groups)  # [F]
    slope = model.quantizer.bound_slope().repeat(groups)  # [F]
    scale = FSQ_SPREAD * latent_std.clamp_min(1e-6)  # [L]
    model.proj.weight[:latent] /= scale[:, None]
    model.decoder.input_layer.weight[:, : len(half_width)] *= (scale[: len(half_width)] * half_width / slope)[None]
