"""The tensor-level API the service calls: encode, decode, embed, reconstruct.

    tok = ATokenizer.load("checkpoint.safetensors")            # ours (config inside)
    tok = ATokenizer.load("atoken-soc.pt", config="atoken-soc.yaml")  # official
    batch, crops = frames_to_sparse([image_hwc])                # model.patchify
    tokens = tok.encode(batch)                                  # latents + coords
    rec = tok.decode(tokens)                                    # tubelets, same coords
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from .autoencoder import AToken, check_latent_width
from .checkpoint import file_sha256, load_into, read_metadata, read_state_dict, save_safetensors
from .config import ATokenConfig, GaussianDecoderConfig, get_variant, load_official_yaml
from .errors import CheckpointError, ConfigError, InvalidInputError, UnsupportedError
from .gaussians import Gaussians
from .gs_decoder import GaussianDecoder
from .patchify import sparse_to_frames, voxel_features
from .sparse import SparseBatch

TokenMode = Literal["continuous", "discrete"]
FORMAT = "atoken-serve/1"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Tokens:
    """What `encode` returns and `decode` takes: one row per token, input row order."""

    coords: Tensor  # [N, 5] int32 (batch, t, x, y, z)
    kinds: tuple[str, ...]  # [B]
    latents: Tensor | None = None  # [N, L] float (continuous)
    indices: Tensor | None = None  # [N, K] int64 FSQ indices (discrete)
    logvar: Tensor | None = None  # [N, L] posterior log-variance (continuous only)

    @property
    def mode(self) -> TokenMode:
        return "discrete" if self.indices is not None else "continuous"


@dataclass
class Reconstruction:
    tokens: Tokens
    tubelets: SparseBatch  # [N, 3072] decoder output, same coords as the input
    frames: list[Tensor | None] = field(default_factory=list)  # per item [T, 3, H, W] in [-1, 1]; None for 3D
    gaussians: list[Gaussians | None] = field(default_factory=list)  # per item; None for images/videos


@dataclass
class ModelInfo:
    variant: str
    checkpoint: str | None
    sha256: str | None
    trained: bool
    dtype: str
    device: str
    card: dict = field(default_factory=dict)


class ATokenizer:
    def __init__(self, model: AToken, gs_decoder: GaussianDecoder | None = None, info: ModelInfo | None = None):
        self.model = model.eval()
        self.gs_decoder = gs_decoder.eval() if gs_decoder is not None else None
        param = next(model.parameters())
        self.info = info or ModelInfo("custom", None, None, False, str(param.dtype).removeprefix("torch."),
                                      str(param.device))

    # ----------------------------------------------------------------- construction
    @classmethod
    def from_variant(cls, name: str, seed: int = 0, gs: GaussianDecoderConfig | None = None, **kw) -> "ATokenizer":
        """Randomly initialised (untrained) model of a named variant: for tests and benchmarks."""
        torch.manual_seed(seed)
        model = AToken(get_variant(name))
        gs_decoder = GaussianDecoder(gs) if gs else None
        info = ModelInfo(name, None, None, False, "float32", "cpu")
        return cls(model, gs_decoder, info).to(**kw) if kw else cls(model, gs_decoder, info)

    @classmethod
    def load(
        cls,
        checkpoint: str | Path,
        config: str | Path | ATokenConfig | None = None,
        gs_checkpoint: str | Path | None = None,
        gs_config: str | Path | GaussianDecoderConfig | None = None,
        dtype: str | torch.dtype = "float32",
        device: str | torch.device = "cpu",
    ) -> "ATokenizer":
        """Load ours (config in the safetensors metadata) or an official `.pt`/`.safetensors`
        with its YAML config (or a variant name)."""
        checkpoint = Path(checkpoint)
        if not checkpoint.is_file():
            raise CheckpointError(f"checkpoint {checkpoint} does not exist")
        meta = read_metadata(checkpoint) if checkpoint.suffix == ".safetensors" else {}
        cfg = _resolve_config(config, meta, checkpoint)
        if not isinstance(cfg, ATokenConfig):
            raise ConfigError(f"{config} is a GS decoder config; pass it as gs_config")
        model = AToken(cfg)
        load_into(model, read_state_dict(checkpoint), source=str(checkpoint))
        gs_decoder = None
        if gs_checkpoint is not None:
            gs_checkpoint = Path(gs_checkpoint)
            gs_meta = read_metadata(gs_checkpoint) if gs_checkpoint.suffix == ".safetensors" else {}
            gcfg = _resolve_gs_config(gs_config, gs_meta, gs_checkpoint)
            gs_decoder = GaussianDecoder(gcfg)
            load_into(gs_decoder, read_state_dict(gs_checkpoint), source=str(gs_checkpoint))
        card = meta.get("model_card", {}) if isinstance(meta.get("model_card"), dict) else {}
        info = ModelInfo(
            variant=str(meta.get("variant", Path(str(config)).stem if config else checkpoint.stem)),
            checkpoint=str(checkpoint), sha256=file_sha256(checkpoint),
            trained=bool(meta.get("trained", True)), dtype="float32", device="cpu", card=card,
        )
        return cls(model, gs_decoder, info).to(device=device, dtype=dtype)

    def to(self, device: str | torch.device | None = None, dtype: str | torch.dtype | None = None) -> "ATokenizer":
        if isinstance(dtype, str):
            if dtype not in DTYPES:
                raise ConfigError(f"dtype {dtype!r} unsupported; choose from {sorted(DTYPES)}")
            dtype = DTYPES[dtype]
        for module in (self.model, self.gs_decoder):
            if module is not None:
                module.to(device=device, dtype=dtype)
        param = next(self.model.parameters())
        self.info.dtype = str(param.dtype).removeprefix("torch.")
        self.info.device = str(param.device)
        return self

    def save(self, path: str | Path, model_card: dict | None = None, trained: bool = True,
             storage_dtype: str | None = None) -> None:
        meta = {"format": FORMAT, "config": self.model.cfg.to_dict(), "variant": self.info.variant,
                "trained": "true" if trained else "false", "model_card": model_card or {}}
        save_safetensors(self.model, path, meta, DTYPES[storage_dtype] if storage_dtype else None)

    def save_gs(self, path: str | Path, model_card: dict | None = None) -> None:
        if self.gs_decoder is None:
            raise UnsupportedError("no Gaussian decoder loaded")
        save_safetensors(self.gs_decoder, path, {"format": FORMAT, "gs_config": self.gs_decoder.cfg.to_dict(),
                                                 "model_card": model_card or {}})

    # ----------------------------------------------------------------- properties
    @property
    def config(self) -> ATokenConfig:
        return self.model.cfg

    @property
    def supports_discrete(self) -> bool:
        return self.model.quantizer is not None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _prepare(self, batch: SparseBatch) -> SparseBatch:
        return SparseBatch(batch.feats.to(self.device), batch.coords.to(self.device), batch.kinds)

    # ----------------------------------------------------------------- operations
    @torch.inference_mode()
    def encode(self, batch: SparseBatch, mode: TokenMode = "continuous", sample: bool = False,
               generator: torch.Generator | None = None) -> Tokens:
        """Tubelets [N, 3072] -> tokens. Deterministic (posterior mean) unless `sample`."""
        if mode not in ("continuous", "discrete"):
            raise InvalidInputError(f"token mode must be 'continuous' or 'discrete', got {mode!r}")
        if mode == "discrete" and not self.supports_discrete:
            raise UnsupportedError(f"model {self.info.variant!r} has no quantizer; discrete tokens are unavailable")
        batch = self._prepare(batch)
        enc = self.model.encode(batch)
        if mode == "discrete":
            _, indices, _ = self.model.quantize(enc.mean)
            return Tokens(batch.coords.to(torch.int32).cpu(), batch.kinds, indices=indices.cpu())
        latents = enc.sample(generator) if sample else enc.mean
        return Tokens(batch.coords.to(torch.int32).cpu(), batch.kinds, latents=latents.float().cpu(),
                      logvar=enc.logvar.float().cpu())

    @torch.inference_mode()
    def embed(self, batch: SparseBatch, dense: bool = False) -> tuple[Tensor, Tensor | None]:
        """L2-normalised global embedding [B, C]; with `dense`, also per-token features [N, C]."""
        enc = self.model.encode(self._prepare(batch))
        return enc.embedding.float().cpu(), (enc.features.float().cpu() if dense else None)

    def latent_batch(self, tokens: Tokens) -> SparseBatch:
        """Decoder input for `tokens`, validated."""
        if (tokens.latents is None) == (tokens.indices is None):
            raise InvalidInputError("tokens need exactly one of latents (continuous) or indices (discrete)")
        if tokens.indices is not None:
            if not self.supports_discrete:
                raise UnsupportedError("this model has no quantizer; it cannot decode discrete indices")
            latents = self.model.codes_to_latent(self.model.quantizer.indices_to_codes(tokens.indices.to(self.device)))
        else:
            latents = tokens.latents
            check_latent_width(latents, self.config.latent_channels)
        if latents.shape[0] != tokens.coords.shape[0]:
            raise InvalidInputError(f"{latents.shape[0]} token rows but {tokens.coords.shape[0]} coords")
        return SparseBatch(latents.to(self.device), tokens.coords.to(self.device), tuple(tokens.kinds))

    @torch.inference_mode()
    def decode(self, tokens: Tokens) -> SparseBatch:
        """Tokens -> reconstructed tubelets [N, 3072] (float32, CPU), same coords."""
        latents = self.latent_batch(tokens)
        rec = self.model.decode(latents)
        return SparseBatch(rec.float().cpu(), tokens.coords, tuple(tokens.kinds))

    @torch.inference_mode()
    def decode_gaussians(self, tubelets: SparseBatch) -> list[Gaussians | None]:
        """3D items of a reconstruction -> Gaussians (None for images and videos)."""
        if "3D" not in tubelets.kinds:
            return [None] * tubelets.batch_size
        if self.gs_decoder is None:
            raise UnsupportedError("no Gaussian decoder loaded: 3D reconstruction needs one")
        out: list[Gaussians | None] = []
        for b, kind in enumerate(tubelets.kinds):
            if kind != "3D":
                out.append(None)
                continue
            xyz, feats = voxel_features(tubelets, b)
            coords = torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1).to(self.device)
            gauss = self.gs_decoder.decode(feats.to(self.device), coords)[0]
            out.append(gauss.to("cpu"))
        return out

    def reconstruct(self, batch: SparseBatch, mode: TokenMode = "continuous") -> Reconstruction:
        tokens = self.encode(batch, mode)
        tubelets = self.decode(tokens)
        frames = [f.clamp(-1, 1) if f is not None else None for f in sparse_to_frames(tubelets)]
        gaussians = self.decode_gaussians(tubelets) if self.gs_decoder is not None else [None] * batch.batch_size
        return Reconstruction(tokens, tubelets, frames, gaussians)


def _resolve_config(config, meta: dict, checkpoint: Path) -> ATokenConfig | GaussianDecoderConfig:
    if isinstance(config, ATokenConfig):
        return config
    if config is None:
        if "config" in meta:
            return ATokenConfig.from_dict(meta["config"])
        raise ConfigError(f"{checkpoint} carries no config: pass the official YAML config or a variant name")
    path = Path(str(config))
    if path.suffix in (".yaml", ".yml"):
        return load_official_yaml(path)
    return get_variant(str(config))


def _resolve_gs_config(config, meta: dict, checkpoint: Path) -> GaussianDecoderConfig:
    if isinstance(config, GaussianDecoderConfig):
        return config
    if config is None:
        if "gs_config" in meta:
            return GaussianDecoderConfig.from_dict(meta["gs_config"])
        return GaussianDecoderConfig()  # the official 3d_decode_gs.yaml shape
    cfg = load_official_yaml(config)
    if not isinstance(cfg, GaussianDecoderConfig):
        raise ConfigError(f"{config} is not a GS decoder config")
    return cfg
