"""AToken: encoder -> diagonal Gaussian posterior (-> FSQ) -> decoder, on packed 4D tokens.

Module and parameter names equal the official `AutoencoderKL` state-dict keys, so official
checkpoints load without renaming.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ATokenConfig
from .errors import InvalidInputError, UnsupportedError
from .fsq import FSQ
from .layers.attention import PoolState
from .layout import TokenLayout
from .sparse import SparseBatch
from .transformer import Decoder, Encoder


@dataclass
class EncoderOutput:
    """Per-token tensors are in the input row order."""

    features: Tensor  # [N, C] encoder output after post_layernorm ("x_no_proj")
    posterior: Tensor  # [N, 2L] concat(mean, logvar)
    pooled: Tensor | None  # [B, C] attention-pooling head output, not normalised (None: pool=False)
    embedding: Tensor | None  # [B, C] L2-normalised pooled output (None: pool=False)
    pool_state: PoolState | None = None  # the pooling's softmax state, to merge with other pieces

    @property
    def mean(self) -> Tensor:  # [N, L]
        return self.posterior[:, : self.posterior.shape[1] // 2]

    @property
    def logvar(self) -> Tensor:  # [N, L]
        return self.posterior[:, self.posterior.shape[1] // 2 :]

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        """mean + std * eps; logvar is clamped to [-30, 20] for the std only (as diffusers does)."""
        std = torch.exp(0.5 * self.logvar.float().clamp(-30.0, 20.0))
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=torch.float32)
        return (self.mean.float() + std * eps).to(self.mean.dtype)


class AToken(nn.Module):
    def __init__(self, cfg: ATokenConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg.encoder, cfg.in_channels)
        self.proj = nn.Linear(cfg.encoder.model_channels, 2 * cfg.latent_channels, bias=False)
        self.quantizer = FSQ(cfg.quantizer) if cfg.quantizer else None
        self.decoder = Decoder(cfg.decoder, cfg.latent_channels, cfg.out_channels) if cfg.use_decoder else None

    def layout(self, batch: SparseBatch, feat_dim: int | tuple[int, ...]) -> TokenLayout:
        batch.validate(feat_dim=feat_dim, max_tokens=self.cfg.max_tokens)
        return TokenLayout.build(batch.coords, batch.batch_size)

    def encode(self, batch: SparseBatch, layout: TokenLayout | None = None, pool: bool = True) -> EncoderOutput:
        """batch.feats: [N, 3072] tubelet values in [-1, 1], or [N, 768] when every tubelet's
        last three frames are zeros (images, 3D voxels): the zeros need not be stored.
        pool=False skips the attention-pooling head (tokens only: no pooled, embedding or state)."""
        layout = layout or self.layout(batch, (self.cfg.in_channels, self.encoder.short_input))
        dtype = self.proj.weight.dtype
        x = self.encoder(layout.to_segment_order(batch.feats.to(dtype)), layout)
        state = self.encoder.head.state(x, layout.sample, layout.batch_size) if pool else None
        pooled = self.encoder.head.finish(state) if pool else None
        posterior = self.proj(x)
        return EncoderOutput(
            features=layout.to_input_order(x),
            posterior=layout.to_input_order(posterior),
            pooled=pooled,
            embedding=F.normalize(pooled.float(), dim=-1) if pool else None,
            pool_state=state,
        )

    def pool(self, state: PoolState) -> tuple[Tensor, Tensor]:
        """A merged pooling state (e.g. of a long video's tiles) -> (pooled [B, C], embedding [B, C])."""
        pooled = self.encoder.head.finish(state.to(self.proj.weight.device))
        return pooled, F.normalize(pooled.float(), dim=-1)

    def quantize(self, mean: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """mean [N, L] -> (codes [N, F], indices [N, K], bounded [N, K, d]); FSQ reads the first F channels."""
        if self.quantizer is None:
            raise UnsupportedError("this model has no quantizer: discrete tokens need an FSQ variant (e.g. so400m-d)")
        return self.quantizer(mean[:, : self.quantizer.cfg.feature_dim])

    def codes_to_latent(self, codes: Tensor) -> Tensor:
        """FSQ codes [N, F] -> decoder input [N, L] (zero-padded when F < L)."""
        return F.pad(codes, (0, self.cfg.latent_channels - codes.shape[1]))

    def decode(self, latents: SparseBatch, layout: TokenLayout | None = None, columns: int | None = None) -> Tensor:
        """latents.feats: [N, L] -> reconstructed tubelets [N, 3072] in input row order, or their
        first `columns` values (768: the first frame, all an image keeps of its tubelet)."""
        if self.decoder is None:
            raise UnsupportedError("this model was built without a decoder")
        layout = layout or self.layout(latents, self.cfg.latent_channels)
        x = latents.feats.to(self.proj.weight.dtype)
        return layout.to_input_order(self.decoder(layout.to_segment_order(x), layout, columns))

    def forward(self, batch: SparseBatch, discrete: bool = False) -> dict[str, Tensor]:
        """Round trip with every named intermediate (posterior mean, never a sample)."""
        layout = self.layout(batch, self.cfg.in_channels)
        enc = self.encode(batch, layout)
        out = {"features": enc.features, "posterior": enc.posterior, "pooled": enc.pooled,
               "embedding": enc.embedding}
        latent = enc.mean
        if discrete:
            codes, indices, bounded = self.quantize(enc.mean)
            out.update(fsq_codes=codes, fsq_indices=indices, fsq_bounded=bounded)
            latent = self.codes_to_latent(codes)
        out["latent"] = latent
        out["reconstruction"] = self.decode(batch.with_feats(latent), layout)
        return out


def check_latent_width(latents: Tensor, width: int) -> None:
    if latents.ndim != 2 or latents.shape[1] != width:
        raise InvalidInputError(f"latents must be [N, {width}], got shape {tuple(latents.shape)}")
