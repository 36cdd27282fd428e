"""Building blocks, one concept per module."""

from .attention import Segments, get_backend, set_backend, varlen_attention
from .attn_block import SelfAttention, TransformerBlock
from .attn_pool import AttentionPoolHead
from .mlp import Mlp
from .norm import LayerNorm, QKRMSNorm, RMSNorm
from .pos_embed import LearnedPosTable
from .rope import apply_rope, rope_angles

__all__ = [
    "AttentionPoolHead", "LayerNorm", "LearnedPosTable", "Mlp", "QKRMSNorm", "RMSNorm", "Segments",
    "SelfAttention", "TransformerBlock", "apply_rope", "get_backend", "rope_angles", "set_backend",
    "varlen_attention",
]
