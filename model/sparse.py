"""Packed, variable-length batches of 4D tokens.

A batch is a feature matrix plus integer coordinates (batch, t, x, y, z) per row, so images
of different sizes, videos and 3D assets share one batch without padding. Rows of one item
need not be contiguous; the model sorts them into attention segments itself.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal, Sequence

import torch
from torch import Tensor

from .errors import InvalidInputError, TokenLimitError

Kind = Literal["image", "video", "3D"]
KINDS: tuple[str, ...] = ("image", "video", "3D")
MAX_COORD = 4096  # any axis; 4096 patches = 65k pixels, far past any sane input


@dataclass(frozen=True)
class SparseBatch:
    feats: Tensor  # [N, F] float
    coords: Tensor  # [N, 5] int32 (batch, t, x, y, z)
    kinds: tuple[str, ...]  # [B] "image" | "video" | "3D"

    @property
    def batch_size(self) -> int:
        return len(self.kinds)

    @property
    def num_tokens(self) -> int:
        return self.coords.shape[0]

    def with_feats(self, feats: Tensor) -> "SparseBatch":
        return replace(self, feats=feats)

    def validate(self, feat_dim: int | tuple[int, ...] | None = None, max_tokens: int | None = None) -> "SparseBatch":
        """Check shapes, dtypes and coordinate ranges; raise InvalidInputError naming the problem.
        feat_dim: the channel count, or the counts allowed."""
        feats, coords = self.feats, self.coords
        if not isinstance(feats, Tensor) or not isinstance(coords, Tensor):
            raise InvalidInputError("feats and coords must be torch tensors")
        if feats.ndim != 2:
            raise InvalidInputError(f"feats must be [N, F], got shape {tuple(feats.shape)}")
        allowed = (feat_dim,) if isinstance(feat_dim, int) else feat_dim
        if allowed is not None and feats.shape[1] not in allowed:
            want = " or ".join(str(d) for d in allowed)
            raise InvalidInputError(f"feats must have {want} channels, got {feats.shape[1]}")
        if not feats.is_floating_point():
            raise InvalidInputError(f"feats must be floating point, got {feats.dtype}")
        if coords.ndim != 2 or coords.shape[1] != 5:
            raise InvalidInputError(f"coords must be [N, 5] (batch, t, x, y, z), got shape {tuple(coords.shape)}")
        if coords.dtype not in (torch.int32, torch.int64):
            raise InvalidInputError(f"coords must be int32 or int64, got {coords.dtype}")
        if coords.shape[0] != feats.shape[0]:
            raise InvalidInputError(f"feats has {feats.shape[0]} rows but coords has {coords.shape[0]}")
        if coords.shape[0] == 0 or not self.kinds:
            raise InvalidInputError("empty batch: no tokens")
        if max_tokens is not None and coords.shape[0] > max_tokens:
            raise TokenLimitError(
                f"batch holds {coords.shape[0]} tokens, more than the maximum {max_tokens}",
                limit=max_tokens, actual=coords.shape[0],
            )
        bad = [k for k in self.kinds if k not in KINDS]
        if bad:
            raise InvalidInputError(f"unknown item kinds {bad}; expected one of {KINDS}")
        lo, hi = coords.min(0).values.tolist(), coords.max(0).values.tolist()
        if min(lo) < 0:
            raise InvalidInputError(f"coords must be non-negative, got minimum {lo}")
        if hi[0] >= self.batch_size:
            raise InvalidInputError(f"batch index {hi[0]} out of range for {self.batch_size} items")
        if max(hi[1:]) >= MAX_COORD:
            raise InvalidInputError(f"coords {hi[1:]} exceed the grid limit {MAX_COORD}")
        present = torch.bincount(coords[:, 0].long(), minlength=self.batch_size)
        if (present == 0).any():
            raise InvalidInputError(f"items {torch.nonzero(present == 0).flatten().tolist()} have no tokens")
        # min/max propagate NaN and expose Inf in one pass, without a mask as large as feats.
        lo_f, hi_f = torch.aminmax(feats)
        if not (torch.isfinite(lo_f) and torch.isfinite(hi_f)):
            raise InvalidInputError("feats contain NaN or Inf")
        return self

    def item(self, index: int) -> "SparseBatch":
        """One item as its own batch (batch index 0), rows in their original order."""
        mask = self.coords[:, 0] == index
        coords = self.coords[mask].clone()
        coords[:, 0] = 0
        return SparseBatch(self.feats[mask], coords, (self.kinds[index],))

    def split(self) -> list["SparseBatch"]:
        return [self.item(i) for i in range(self.batch_size)]

    def tokens_per_item(self) -> list[int]:
        return torch.bincount(self.coords[:, 0].long(), minlength=self.batch_size).tolist()


def cat(batches: Sequence[SparseBatch]) -> SparseBatch:
    """Pack several batches into one, renumbering batch indices in order."""
    if not batches:
        raise InvalidInputError("cannot concatenate zero batches")
    coords, offset = [], 0
    for b in batches:
        c = b.coords.clone()
        c[:, 0] += offset
        coords.append(c)
        offset += b.batch_size
    kinds = tuple(k for b in batches for k in b.kinds)
    return SparseBatch(torch.cat([b.feats for b in batches]), torch.cat(coords), kinds)


def split_rows(values: Tensor, coords: Tensor, batch_size: int) -> list[Tensor]:
    """Rows of `values` ([N, ...]) grouped by the batch column of coords, original order kept."""
    return [values[coords[:, 0] == b] for b in range(batch_size)]
