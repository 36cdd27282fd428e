"""AToken in PyTorch: a unified tokenizer for images, videos and 3D assets.

Tensors in, tensors out; no file formats here (see `service/` for media).

Names are loaded on first use (PEP 562), so `model.errors` and `model.config` import without
torch: the service's input decoding, run in bulk pre-processing processes, needs only them.
"""

from importlib import import_module

_HOMES = {
    "ATokenizer": "api", "Reconstruction": "api", "Tokens": "api",
    "AToken": "autoencoder", "EncoderOutput": "autoencoder",
    "VARIANTS": "config", "ATokenConfig": "config", "FSQConfig": "config", "GaussianDecoderConfig": "config",
    "TransformerConfig": "config", "get_variant": "config",
    "ATokenError": "errors", "CheckpointError": "errors", "ConfigError": "errors", "InvalidInputError": "errors",
    "TokenLimitError": "errors", "UnsupportedError": "errors",
    "Gaussians": "gaussians", "GaussianDecoder": "gs_decoder", "SparseBatch": "sparse",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name not in _HOMES:
        raise AttributeError(f"module 'model' has no attribute {name!r}")
    value = getattr(import_module(f".{_HOMES[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOMES))
