"""Exact attention over packed variable-length sequences.

Tokens of one sequence are contiguous; `Segments` describes where each starts. Backends:

* ``torch``: groups sequences of equal length and runs one `scaled_dot_product_attention`
  per length, so a batch of same-sized images costs what a fixed-shape ViT costs, and no
  N x N mask over the whole packed batch is ever built;
* ``flash``: `flash_attn_varlen_func` (GPU, fp16/bf16, when flash-attn is installed);
* ``reference``: one sequence at a time with explicit softmax; the test oracle.

``ATOKEN_ATTN_BACKEND`` (auto|torch|flash|reference) or `set_backend` picks one; ``auto``
uses flash where it applies and torch elsewhere.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .switch import Switch

BACKENDS = ("auto", "torch", "flash", "reference")
_backend = Switch("ATOKEN_ATTN_BACKEND", BACKENDS, "attention backend")

try:  # pragma: no cover - only on GPU machines with flash-attn
    from flash_attn import flash_attn_varlen_func as _flash_varlen
except Exception:  # noqa: BLE001 - any import failure means "not available"
    _flash_varlen = None


def set_backend(name: str) -> None:
    _backend.set(name)


def get_backend() -> str:
    return _backend.value


def flash_available() -> bool:
    return _flash_varlen is not None and torch.cuda.is_available()


@dataclass(frozen=True)
class Segments:
    """Lengths of consecutive sequences in a packed tensor."""

    lengths: tuple[int, ...]
    device: torch.device

    @classmethod
    def from_ids(cls, ids: Tensor) -> "Segments":
        """ids: [N] sorted so that equal ids are contiguous."""
        _, counts = torch.unique_consecutive(ids, return_counts=True)
        return cls(tuple(counts.tolist()), ids.device)

    @cached_property
    def cu_seqlens(self) -> Tensor:  # [S + 1] int32
        lengths = torch.tensor((0,) + self.lengths, dtype=torch.int32, device=self.device)
        return lengths.cumsum(0, dtype=torch.int32)

    @cached_property
    def max_len(self) -> int:
        return max(self.lengths)

    @cached_property
    def groups(self) -> list[tuple[int, Tensor | None]]:
        """(length, token index [G, L]) per distinct length; index None = the whole tensor is
        G back-to-back sequences of that length, so a reshape serves."""
        if len(set(self.lengths)) == 1:
            return [(self.lengths[0], None)]
        starts = self.cu_seqlens[:-1].long()
        lengths = torch.tensor(self.lengths, device=self.device)
        out = []
        for length in sorted(set(self.lengths)):
            first = starts[lengths == length]
            out.append((length, first[:, None] + torch.arange(length, device=self.device)))
        return out


def _softcapped(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float) -> Tensor:
    logits = (q @ k.transpose(-1, -2)).float() * scale  # [..., Lq, Lk]
    if softcap > 0:
        logits = softcap * torch.tanh(logits / softcap)
    return (logits.softmax(-1).to(v.dtype)) @ v


def _torch_backend(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float, softcap: float) -> Tensor:
    out = torch.empty_like(q)
    for length, index in seg.groups:
        if index is None:
            qg, kg, vg = (t.reshape(-1, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        else:
            qg, kg, vg = (t[index].transpose(1, 2) for t in (q, k, v))  # [G, H, L, D]
        if softcap > 0:
            o = _softcapped(qg, kg, vg, scale, softcap)
        else:
            o = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
        o = o.transpose(1, 2)  # [G, L, H, D]
        if index is None:
            out = o.reshape(q.shape)
        else:
            out[index] = o
    return out


def _reference_backend(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float, softcap: float) -> Tensor:
    outs, start = [], 0
    for length in seg.lengths:
        sl = slice(start, start + length)
        qs, ks, vs = (t[sl].transpose(0, 1) for t in (q, k, v))  # [H, L, D]
        outs.append(_softcapped(qs, ks, vs, scale, softcap).transpose(0, 1))
        start += length
    return torch.cat(outs)


def _flash_backend(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float, softcap: float) -> Tensor:
    cu, m = seg.cu_seqlens, seg.max_len
    return _flash_varlen(q, k, v, cu, cu, m, m, softmax_scale=scale, softcap=softcap)


def resolve_backend(q: Tensor) -> str:
    if _backend.value != "auto":
        return _backend.value
    if _flash_varlen is not None and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        return "flash"
    return "torch"


def varlen_attention(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float, softcap: float = 0.0) -> Tensor:
    """Self-attention inside each segment.

    q, k, v: [N, H, D], segments contiguous
    returns: [N, H, D]
    """
    backend = resolve_backend(q)
    if backend == "flash":
        if _flash_varlen is None or not q.is_cuda:
            raise ConfigError("attention backend 'flash' needs flash-attn and a CUDA tensor")
        return _flash_backend(q, k, v, seg, scale, softcap)
    if backend == "reference":
        return _reference_backend(q, k, v, seg, scale, softcap)
    return _torch_backend(q, k, v, seg, scale, softcap)


@dataclass
class PoolState:
    """Online-softmax state of the pooling attention, per sample and head: enough to pool a
    sample whose tokens arrive in pieces (a long video's tiles) in constant memory, and equal
    to pooling all tokens at once (up to float rounding). Merge pieces with `merge_pool_states`."""

    peak: Tensor  # [B, H] largest logit seen
    total: Tensor  # [B, H] sum of exp(logit - peak)
    weighted: Tensor  # [B, H, D] sum of exp(logit - peak) * v

    def select(self, b: int) -> "PoolState":
        return PoolState(self.peak[b : b + 1], self.total[b : b + 1], self.weighted[b : b + 1])

    def to(self, device) -> "PoolState":
        return PoolState(self.peak.to(device), self.total.to(device), self.weighted.to(device))

    def normalized(self) -> Tensor:  # [B, H, D]
        return self.weighted / self.total[..., None]


def merge_pool_states(states: list[PoolState]) -> PoolState:
    """Pieces of the same samples -> one state, rescaled to the largest peak (log-sum-exp)."""
    peak = torch.stack([s.peak for s in states]).amax(0)
    scales = [(s.peak - peak).exp() for s in states]
    total = sum(s.total * c for s, c in zip(states, scales))
    weighted = sum(s.weighted * c[..., None] for s, c in zip(states, scales))
    return PoolState(peak, total, weighted)


def segment_softmax_state(q: Tensor, k: Tensor, v: Tensor, sample: Tensor, num_samples: int,
                          scale: float) -> PoolState:
    """q [B, H, D] one query per sample; k, v [N, H, D]; sample [N] int64 -> float32 state."""
    logits = (k.float() * q.float()[sample]).sum(-1) * scale  # [N, H]
    peak = torch.full((num_samples, logits.shape[1]), float("-inf"), device=k.device)
    peak = peak.scatter_reduce(0, sample[:, None].expand_as(logits), logits, reduce="amax")
    weights = (logits - peak[sample]).exp()  # [N, H]
    total = torch.zeros_like(peak).index_add_(0, sample, weights)
    weighted = torch.zeros(num_samples, *v.shape[1:], device=v.device).index_add_(
        0, sample, weights[..., None] * v.float())
    return PoolState(peak, total, weighted)


def segment_softmax_pool(q: Tensor, k: Tensor, v: Tensor, sample: Tensor, num_samples: int, scale: float) -> Tensor:
    """Attention with one query per sample over that sample's tokens (the pooling head).

    q:       [B, H, D]  one query per sample
    k, v:    [N, H, D]
    sample:  [N] int64 sample of each token
    returns: [B, H, D]
    """
    return segment_softmax_state(q, k, v, sample, num_samples, scale).normalized().to(v.dtype)
