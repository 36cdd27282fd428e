"""What travels between the front end and the model worker: plain tensors and strings
(picklable, so the worker can live in another process or behind Triton)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from torch import Tensor

from model.api import Tokens
from model.sparse import SparseBatch

Op = Literal["embed", "tokenize", "reconstruct", "decode"]
ENCODER_OPS = ("embed", "tokenize", "reconstruct")
DECODER_OPS = ("reconstruct", "decode")


@dataclass
class Job:
    id: int
    op: Op
    mode: Literal["continuous", "discrete"] = "continuous"
    dense: bool = False  # embed: also return per-token features
    gaussians: bool = False  # decode/reconstruct of 3D items: run the Gaussian decoder
    batch: SparseBatch | None = None  # one item's tubelets (batch index 0), encoder ops
    tokens: Tokens | None = None  # one item's tokens (batch index 0), decode

    @property
    def num_tokens(self) -> int:
        source = self.batch.coords if self.batch is not None else self.tokens.coords
        return int(source.shape[0])

    @property
    def cost(self) -> int:
        """Compute cost in token passes: encoder and decoder each count once."""
        passes = (self.op in ENCODER_OPS) + (self.op in DECODER_OPS)
        return self.num_tokens * passes


@dataclass
class JobResult:
    id: int
    embedding: Tensor | None = None  # [C]
    features: Tensor | None = None  # [n, C]
    tokens: Tokens | None = None
    tubelets: Tensor | None = None  # [n, 3072] reconstruction, same coords as the input
    gaussians: dict[str, Tensor] | None = None  # raw Gaussian fields (see model.gaussians)
    error: tuple[str, str] | None = None  # (error class name, message)
    compute_ms: float = 0.0
    extra: dict = field(default_factory=dict)
