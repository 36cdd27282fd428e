"""Typed model configs, the table of named variants, and readers for official YAML configs.

Field names follow the official `arch_cfg` keys (apple/ml-atoken) so an official config maps
one to one; `from_arch_cfg` / `to_arch_cfg` convert.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .errors import ConfigError

PATCH_SIZE = (4, 16, 16)  # (t, h, w) of one tubelet
PATCH_VALUES = PATCH_SIZE[0] * PATCH_SIZE[1] * PATCH_SIZE[2] * 3  # 3072
VOXEL_FEATURES = PATCH_SIZE[1] * PATCH_SIZE[2] * 3  # 768: one 16x16 RGB patch per voxel
VOXEL_GRID = 64  # 3D assets live on a 64^3 grid
TEMPORAL_TILE = 4  # latent frames per tile (16 video frames)
POS_TABLE_SIDE = 16  # learned position table is 16x16 (SigLIP2 at 256 px)


@dataclass(frozen=True)
class TransformerConfig:
    """One stack of pre-norm transformer blocks (the encoder or the decoder)."""

    model_channels: int
    num_blocks: int
    num_heads: int
    mlp_channels: int
    attn_mode: Literal["full"] = "full"
    pe_mode: Literal["joint"] = "joint"
    qk_rms_norm: bool = False
    use_bias: bool = True
    use_rms_norm: bool = False

    @property
    def head_dim(self) -> int:
        return self.model_channels // self.num_heads

    def validate(self, name: str) -> None:
        if self.model_channels % self.num_heads:
            raise ConfigError(f"{name}: model_channels {self.model_channels} not divisible by num_heads {self.num_heads}")
        if self.head_dim % 8:
            raise ConfigError(f"{name}: head_dim {self.head_dim} must be divisible by 8 for 4D RoPE")
        if self.attn_mode != "full":
            raise ConfigError(f"{name}: attn_mode {self.attn_mode!r} not supported (official AToken uses 'full')")
        if self.pe_mode != "joint":
            raise ConfigError(f"{name}: pe_mode {self.pe_mode!r} not supported (official AToken uses 'joint')")


@dataclass(frozen=True)
class FSQConfig:
    """Finite scalar quantizer: `num_codebooks` groups, each a code of `len(levels)` dims."""

    levels: tuple[int, ...] = (4, 4, 4, 4, 4, 4)
    num_codebooks: int = 8

    @property
    def codebook_dim(self) -> int:
        return len(self.levels)

    @property
    def codebook_size(self) -> int:
        size = 1
        for level in self.levels:
            size *= level
        return size

    @property
    def feature_dim(self) -> int:
        return self.codebook_dim * self.num_codebooks


@dataclass(frozen=True)
class ATokenConfig:
    """The tokenizer: encoder, posterior projection, optional FSQ, decoder."""

    encoder: TransformerConfig
    decoder: TransformerConfig
    latent_channels: int = 48
    patch_size: tuple[int, int, int] = PATCH_SIZE
    in_channels: int = PATCH_VALUES
    out_channels: int = PATCH_VALUES
    quantizer: FSQConfig | None = None
    use_decoder: bool = True
    max_tokens: int = 65536  # per forward call; guards memory, raises TokenLimitError

    def __post_init__(self) -> None:
        self.encoder.validate("encoder")
        self.decoder.validate("decoder")
        if tuple(self.patch_size) != PATCH_SIZE:
            raise ConfigError(f"patch_size {self.patch_size} unsupported; AToken uses {PATCH_SIZE}")
        if self.in_channels != PATCH_VALUES or self.out_channels != PATCH_VALUES:
            raise ConfigError(f"in/out channels must be {PATCH_VALUES}")
        if self.quantizer and self.quantizer.feature_dim > self.latent_channels:
            raise ConfigError(
                f"quantizer feature_dim {self.quantizer.feature_dim} exceeds latent_channels {self.latent_channels}"
            )

    @property
    def embed_dim(self) -> int:
        return self.encoder.model_channels

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ATokenConfig":
        data = dict(data)
        data["encoder"] = TransformerConfig(**data["encoder"])
        data["decoder"] = TransformerConfig(**data["decoder"])
        q = data.get("quantizer")
        data["quantizer"] = FSQConfig(levels=tuple(q["levels"]), num_codebooks=q["num_codebooks"]) if q else None
        data["patch_size"] = tuple(data.get("patch_size", PATCH_SIZE))
        return cls(**data)


@dataclass(frozen=True)
class GaussianDecoderConfig:
    """The 3D Gaussian-splat decoder (official `3d_decode_gs.yaml`)."""

    resolution: int = 64
    model_channels: int = 768
    latent_channels: int = 768
    num_blocks: int = 12
    num_heads: int = 12
    mlp_channels: int = 3072
    window_size: int = 8
    num_gaussians: int = 32
    voxel_size: float = 1.5
    perturb_offset: bool = True
    scaling_bias: float = 4e-3
    opacity_bias: float = 0.1
    filter_3d: float = 9e-4  # 3d_filter_kernel_size, added in quadrature to scales
    filter_2d: float = 0.1  # 2d_filter_kernel_size, used by the rasteriser
    lr: dict[str, float] = field(
        default_factory=lambda: {"_xyz": 1.0, "_features_dc": 1.0, "_opacity": 1.0, "_scaling": 1.0, "_rotation": 0.1}
    )
    softcap: float = 30.0  # flash-attn's varlen windowed path (official default backend)

    def __post_init__(self) -> None:
        if self.model_channels % self.num_heads:
            raise ConfigError("gs decoder: model_channels not divisible by num_heads")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "GaussianDecoderConfig":
        return cls(**data)


def _so400m(**kw: Any) -> TransformerConfig:
    return TransformerConfig(model_channels=1152, num_blocks=27, num_heads=16, mlp_channels=4304, **kw)


_ENC = dict(qk_rms_norm=False, use_bias=True, use_rms_norm=False)
_DEC = dict(qk_rms_norm=True, use_bias=False, use_rms_norm=True)

VARIANTS: dict[str, ATokenConfig] = {
    "so400m-c": ATokenConfig(encoder=_so400m(**_ENC), decoder=_so400m(**_DEC), latent_channels=48),
    "so400m-c-s1": ATokenConfig(encoder=_so400m(**_ENC), decoder=_so400m(**_DEC), latent_channels=32),
    "so400m-d": ATokenConfig(
        encoder=_so400m(**_ENC), decoder=_so400m(**_DEC), latent_channels=48, quantizer=FSQConfig()
    ),
    "base": ATokenConfig(
        encoder=TransformerConfig(768, 12, 12, 3072, **_ENC),
        decoder=TransformerConfig(768, 12, 12, 3072, **_DEC),
        latent_channels=48,
    ),
    # Small enough to train on a 2-core CPU; head_dim 64 keeps the 4D RoPE layout valid.
    "tiny": ATokenConfig(
        encoder=TransformerConfig(256, 4, 4, 1024, **_ENC),
        decoder=TransformerConfig(256, 4, 4, 1024, **_DEC),
        latent_channels=48,
    ),
    "tiny-d": ATokenConfig(
        encoder=TransformerConfig(256, 4, 4, 1024, **_ENC),
        decoder=TransformerConfig(256, 4, 4, 1024, **_DEC),
        latent_channels=48,
        quantizer=FSQConfig(),
    ),
}

GS_VARIANTS: dict[str, GaussianDecoderConfig] = {
    "gs-official": GaussianDecoderConfig(),
    "gs-tiny": GaussianDecoderConfig(model_channels=192, num_blocks=2, num_heads=3, mlp_channels=768),
    # The shipped default's decoder: gs-tiny with 8 Gaussians per voxel, so that training through
    # the CPU rasteriser stays affordable.
    "gs-small": GaussianDecoderConfig(model_channels=192, num_blocks=2, num_heads=3, mlp_channels=768,
                                      num_gaussians=8),
}


def get_variant(name: str) -> ATokenConfig:
    try:
        return VARIANTS[name]
    except KeyError:
        raise ConfigError(f"unknown variant {name!r}; known: {sorted(VARIANTS)}") from None


def levels_from_codebook_size(codebook_size: int) -> tuple[int, ...]:
    """The official FSQ level table (from the FSQ paper's recommendations)."""
    table = {
        2**4: (5, 3),
        2**6: (8, 8),
        2**8: (8, 6, 5),
        2**9: (8, 8, 8),
        2**10: (8, 5, 5, 5),
        2**11: (8, 8, 6, 5),
        2**12: (4, 4, 4, 4, 4, 4),
        2**14: (8, 8, 8, 6, 5),
        2**16: (8, 8, 8, 5, 5, 5),
    }
    if codebook_size not in table:
        raise ConfigError(f"no FSQ levels for codebook size {codebook_size}; known: {sorted(table)}")
    return table[codebook_size]


def from_arch_cfg(arch: dict[str, Any]) -> ATokenConfig:
    """Build a config from an official `arch_cfg` mapping."""

    def stack(prefix: str) -> TransformerConfig:
        return TransformerConfig(
            model_channels=int(arch[f"{prefix}_model_channels"]),
            num_blocks=int(arch[f"{prefix}_num_blocks"]),
            num_heads=int(arch[f"{prefix}_num_heads"]),
            mlp_channels=int(arch[f"{prefix}_mlp_channels"]),
            attn_mode=arch.get(f"{prefix}_attn_mode", "full"),
            pe_mode=arch.get(f"{prefix}_pe_mode", "joint"),
            qk_rms_norm=bool(arch.get(f"{prefix}_qk_rms_norm", False)),
            use_bias=bool(arch.get(f"{prefix}_use_bias", True)),
            use_rms_norm=bool(arch.get(f"{prefix}_use_rms_norm", False)),
        )

    quantizer = None
    if arch.get("use_quantizer"):
        if arch.get("quantizer_type", "fsq") != "fsq":
            raise ConfigError(f"quantizer_type {arch.get('quantizer_type')!r} unsupported (only 'fsq')")
        if int(arch.get("quantizer_chunk_size", 1)) != 1:
            raise ConfigError("quantizer_chunk_size other than 1 is unsupported")
        levels = levels_from_codebook_size(int(arch["quantizer_codebook_size"]))
        quantizer = FSQConfig(levels=levels, num_codebooks=int(arch["quantizer_num_codebooks"]))
        if quantizer.feature_dim != int(arch.get("quantizer_feature_dim", quantizer.feature_dim)):
            raise ConfigError("quantizer_feature_dim must equal num_codebooks x len(levels) (no projections)")
    try:
        return ATokenConfig(
            encoder=stack("encoder"),
            decoder=stack("decoder"),
            latent_channels=int(arch["latent_channels"]),
            patch_size=tuple(arch.get("patch_size", PATCH_SIZE)),
            in_channels=int(arch.get("in_channels", PATCH_VALUES)),
            out_channels=int(arch.get("out_channels", PATCH_VALUES)),
            quantizer=quantizer,
            use_decoder=bool(arch.get("use_decoder", True)),
        )
    except KeyError as exc:
        raise ConfigError(f"arch_cfg is missing {exc.args[0]!r}") from None


def to_arch_cfg(cfg: ATokenConfig) -> dict[str, Any]:
    """The inverse of `from_arch_cfg`: an official-layout `arch_cfg` mapping."""
    arch: dict[str, Any] = {
        "patch_size": list(cfg.patch_size),
        "in_channels": cfg.in_channels,
        "out_channels": cfg.out_channels,
        "latent_channels": cfg.latent_channels,
    }
    for prefix, stack in (("encoder", cfg.encoder), ("decoder", cfg.decoder)):
        for name in ("model_channels", "num_blocks", "num_heads", "mlp_channels", "attn_mode", "pe_mode",
                     "qk_rms_norm", "use_bias", "use_rms_norm"):
            arch[f"{prefix}_{name}"] = getattr(stack, name)
    arch["use_decoder"] = cfg.use_decoder
    if cfg.quantizer:
        arch.update(
            use_quantizer=True,
            quantizer_type="fsq",
            quantizer_codebook_size=cfg.quantizer.codebook_size,
            quantizer_feature_dim=cfg.quantizer.feature_dim,
            quantizer_num_codebooks=cfg.quantizer.num_codebooks,
            quantizer_chunk_size=1,
        )
    return arch


def gs_from_official(model: dict[str, Any]) -> GaussianDecoderConfig:
    rep = model.get("representation_config", {})
    if model.get("attn_mode", "swin") != "swin":
        raise ConfigError(f"gs decoder attn_mode {model.get('attn_mode')!r} unsupported (official uses 'swin')")
    if rep.get("scaling_activation", "softplus") != "softplus":
        raise ConfigError("gs decoder: only scaling_activation 'softplus' is supported")
    base = GaussianDecoderConfig()
    return GaussianDecoderConfig(
        resolution=int(model.get("resolution", base.resolution)),
        model_channels=int(model["model_channels"]),
        latent_channels=int(model["latent_channels"]),
        num_blocks=int(model["num_blocks"]),
        num_heads=int(model["num_heads"]),
        mlp_channels=int(model["mlp_channels"]),
        window_size=int(model.get("window_size", base.window_size)),
        num_gaussians=int(rep.get("num_gaussians", base.num_gaussians)),
        voxel_size=float(rep.get("voxel_size", base.voxel_size)),
        perturb_offset=bool(rep.get("perturb_offset", True)),
        scaling_bias=float(rep.get("scaling_bias", base.scaling_bias)),
        opacity_bias=float(rep.get("opacity_bias", base.opacity_bias)),
        filter_3d=float(rep.get("3d_filter_kernel_size", base.filter_3d)),
        filter_2d=float(rep.get("2d_filter_kernel_size", base.filter_2d)),
        lr={**base.lr, **rep.get("lr", {})},
    )


def load_official_yaml(path: str | Path) -> ATokenConfig | GaussianDecoderConfig:
    """Read an official config file: `atoken-so*.yaml` or `3d_decode_gs.yaml`."""
    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"cannot read config {path}: {exc}") from None
    model = (doc or {}).get("model")
    if not isinstance(model, dict):
        raise ConfigError(f"{path}: no 'model' mapping")
    if "model_cfg" in model:
        arch = (model["model_cfg"] or {}).get("arch_cfg")
        if not isinstance(arch, dict):
            raise ConfigError(f"{path}: no model.model_cfg.arch_cfg mapping")
        return from_arch_cfg(arch)
    if "model_channels" in model:
        return gs_from_official(model)
    raise ConfigError(f"{path}: neither a tokenizer (model_cfg.arch_cfg) nor a GS decoder config")
