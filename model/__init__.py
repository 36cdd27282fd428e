"""AToken in PyTorch: a unified tokenizer for images, videos and 3D assets.

Tensors in, tensors out; no file formats here (see `service/` for media).
"""

from .api import ATokenizer, Reconstruction, Tokens
from .autoencoder import AToken, EncoderOutput
from .config import VARIANTS, ATokenConfig, FSQConfig, GaussianDecoderConfig, TransformerConfig, get_variant
from .errors import ATokenError, CheckpointError, ConfigError, InvalidInputError, TokenLimitError, UnsupportedError
from .gaussians import Gaussians
from .gs_decoder import GaussianDecoder
from .sparse import SparseBatch

__all__ = [
    "AToken", "ATokenConfig", "ATokenizer", "Reconstruction", "Tokens", "ATokenError", "CheckpointError", "ConfigError", "EncoderOutput", "FSQConfig",
    "GaussianDecoder", "GaussianDecoderConfig", "Gaussians", "InvalidInputError", "SparseBatch",
    "TokenLimitError", "TransformerConfig", "UnsupportedError", "VARIANTS", "get_variant",
]
