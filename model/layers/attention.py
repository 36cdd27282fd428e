"""Exact attention over packed variable-length sequences.

Tokens of one sequence are contiguous; `Segments` describes where each starts. Backends:

* ``torch``: groups sequences of equal length and runs one `scaled_dot_product_attention`
  per length, so a batch of same-sized images costs what a fixed-shape ViT costs, and no
  N x N mask over the whole packed batch is ever built;
* ``blocked``: the same groups, as matmul, softmax, matmul over blocks of (sequence, head)
  pairs or query rows whose scores fit a core's cache (`BLOCK_SCORES_BYTES`), so memory
  stays bounded at any length. On a CPU in bfloat16 it is faster than SDPA's CPU flash
  kernel (docs/performance.md), and as exact;
* ``flash``: `flash_attn_varlen_func` (GPU, fp16/bf16, when flash-attn is installed);
* ``reference``: one sequence at a time with explicit softmax; the test oracle.

``ATOKEN_ATTN_BACKEND`` (auto|torch|blocked|flash|reference) or `set_backend` picks one;
``auto`` uses flash where it applies, blocked on a CPU in bfloat16, and torch elsewhere
(float32 on a CPU: SDPA is 1.1x faster; float16 on a CPU: blocked is 6-12x slower, having no
float16 matrix units to use).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from ..errors import ConfigError
from .switch import Switch

BACKENDS = ("auto", "torch", "blocked", "flash", "reference")
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


def _torch_backend(q: Tensor, k: Tensor, v: Tensor, seg: Segments, scale: float, softcap: float,
                   blocked: bool = False) -> Tensor:
    out = torch.empty_like(q)
    for length, index in seg.groups:
        if index is None:
            qg, kg, vg = (t.reshape(-1, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
        else:
            qg, kg, vg = (t[index].transpose(1, 2) for t in (q, k, v))  # [G, H, L, D]
        if blocked:
            o = _blocked(qg, kg, vg, scale, softcap)
        elif softcap > 0:
            o = _softcapped(qg, kg, vg, scale, softcap)
        else:
            o = F.scaled_dot_product_attention(qg, kg, vg, scale=scale)
        o = o.transpose(1, 2)  # [G, L, H, D]
        if index is None:
            out = o.reshape(q.shape)
        else:
            out[index] = o
    return out


# Scores of one block (Lq x Lk in the input dtype), and the probabilities made from them, stay
# within a core's L2 cache; larger blocks ran slower (4 MiB: 1.3x the time at 16 x 256 tokens).
BLOCK_SCORES_BYTES = 1 << 20
# A sequence whose one (sequence, head) pair's scores exceed that (a video tile, a 3D asset) is
# cut into blocks of query rows, each of which reads all of that pair's keys and values again:
# there fewer, larger blocks are faster. 4 MiB, measured on the shipped model's /reconstruct
# passes: a 16-frame tile level (105.8 against 107.7 ms, one thread), a box mesh's 19,936 voxels
# 1.11x faster on one thread and 1.37x for a lone job's pass on two (14.1-17.3 s -> 10.5-12.5).
ROW_BLOCK_SCORES_BYTES = 4 << 20
# Where no row's largest logit exceeds this in size, the rough scores serve as they are (rounded
# to bfloat16, off by 0.008 at most), and the second pass is saved: the shipped model's encoder
# stays under 1.7 in every block.
ROUGH_LOGITS_MAX = 2.0


def _blocked(q: Tensor, k: Tensor, v: Tensor, scale: float, softcap: float) -> Tensor:
    """q, k, v: [G, H, L, D] (any strides) -> [G, H, L, D]. Beyond copies of the inputs and the
    output, memory is one block's scores, whatever G, H and L are.

    A matmul rounds its float32 sums to the input dtype, and bfloat16 keeps 8 bits: a score of
    20 would be off by up to 0.06, so the largest weights by up to 6%. So each row's scores are
    made twice: roughly, for the row's largest score m, then exactly minus m, with m carried
    by an extra column (q: -m, k: 1) inside the same float32 sums. The scores that carry the
    weight are then near 0 and round finely; softmax does not change when a row is shifted.
    A block whose logits all stay small (`ROUGH_LOGITS_MAX`) keeps its rough scores; where the
    norms of q and k already bound them so (long sequences), nothing looks for their peak."""
    g, h, length, d = q.shape
    n = g * h
    exact_scale = math.frexp(scale)[0] == 0.5  # a power of two scales q without rounding
    # Contiguous once here: with one sequence (G = 1) the reshapes are strided views into the qkv
    # projection's rows, and bmm copied a strided operand whole for every block (a 20,000-token
    # 3D asset: all of K and V again per 26 query rows, 92 GB of copies in an encoder pass).
    q = (q * scale if exact_scale else q).reshape(n, length, d).contiguous()
    k, v = k.reshape(n, length, d).contiguous(), v.reshape(n, length, d).contiguous()
    kt = k.transpose(1, 2)
    q_shift = k_shift = None  # made when a block first needs the exact pass
    row_bytes = length * q.element_size()
    pairs = max(1, BLOCK_SCORES_BYTES // (row_bytes * length))
    rows = length if pairs > 1 else max(1, min(length, ROW_BLOCK_SCORES_BYTES // row_bytes))
    # |q.k| <= |q| |k|: where that keeps every logit of a long sequence's head under
    # ROUGH_LOGITS_MAX, its rough scores serve without a pass over them for their peak, whose
    # blocks outgrow the cache (a box mesh's encoder pass 1.16x faster; the shipped encoder's
    # bound stays under 1.8). Short sequences' blocks stay in cache: there it gained nothing.
    logit_scale = 1.0 if exact_scale else scale  # what a score q.k still needs to be a logit
    bounds = (_norms(q).amax(-1) * _norms(k).amax(-1) * logit_scale).tolist() if pairs == 1 and softcap == 0 else None
    out = torch.empty_like(q)
    for i in range(0, n, pairs):
        small = bounds is not None and bounds[i] <= ROUGH_LOGITS_MAX
        for r in range(0, length, rows):
            scores = torch.bmm(q[i:i + pairs, r:r + rows], kt[i:i + pairs])
            peak = None if small else scores.amax(-1)
            if peak is not None and (softcap > 0 or peak.abs().max().item() * logit_scale > ROUGH_LOGITS_MAX):
                if q_shift is None:
                    q_shift, k_shift = _with_shift_column(q, k)
                block = q_shift[i:i + pairs, r:r + rows]
                block[..., d] = -peak
                scores = torch.bmm(block, k_shift[i:i + pairs])  # q.k - peak
            if softcap > 0:
                scores = scores.float().sub_(block[..., d:d + 1]).mul_(logit_scale)
                scores = scores.div_(softcap).tanh_().mul_(softcap)
            elif not exact_scale:
                scores = scores.mul_(scale)
            torch.bmm(scores.softmax(-1).to(v.dtype), v[i:i + pairs], out=out[i:i + pairs, r:r + rows])
    return out.view(g, h, length, d)


def _norms(x: Tensor) -> Tensor:  # [n, L, D] -> [n, L] float32, without a float32 copy of x
    return torch.linalg.vector_norm(x, dim=-1, dtype=torch.float32)


def _with_shift_column(q: Tensor, k: Tensor) -> tuple[Tensor, Tensor]:
    """q [n, L, D], k [n, L, D] -> q with two columns more (the first set per block to -peak),
    k transposed [n, D + 2, L] with ones in the first: bfloat16 matmuls take values in pairs."""
    d = q.shape[-1]
    q_shift, k_shift = F.pad(q, (0, 2)), F.pad(k, (0, 2))
    k_shift[..., d] = 1
    return q_shift, k_shift.transpose(1, 2)


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
    if q.device.type == "cpu" and q.dtype == torch.bfloat16:  # float16 matmuls crawl on CPUs
        return "blocked"
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
    return _torch_backend(q, k, v, seg, scale, softcap, blocked=backend == "blocked")


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
