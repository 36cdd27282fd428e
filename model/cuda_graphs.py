"""Encoder on fixed shape buckets: pad a packed batch to (items, tokens) and, on a GPU with
flash-attn, replay a CUDA graph captured once per bucket.

``ATOKEN_CUDA_GRAPHS`` (auto|on|off) or `set_cuda_graphs` picks whether a served model uses it
(`graphed_encoder`): ``auto`` on a CUDA device with flash-attn, ``on`` requires those, ``off``
runs every batch eagerly. A batch that fits no bucket, or asks for a pooling state, runs eagerly.

Padding tokens form one extra segment of their own, so real tokens never attend to them and
the pooled embeddings of real items are untouched. Position embeddings and RoPE rotations are
computed outside the graph (they depend on each batch's grid sizes) and copied into static
buffers with everything else; the graph covers the input layer, all blocks (flash varlen
attention with a static cu_seqlens), the final norm, the posterior projection and the pooling
head. Without CUDA the same padded tensors run eagerly, which is how the padding is tested.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

import torch
import torch.nn.functional as F
from torch import Tensor

from .autoencoder import AToken, EncoderOutput
from .errors import ATokenError, ConfigError, TokenLimitError
from .layers.attention import Segments, flash_available
from .layers.switch import Switch
from .layout import TokenLayout
from .sparse import SparseBatch

DEFAULT_BUCKETS = ((1, 256), (4, 1024), (8, 2048), (16, 4096), (32, 8192))
_mode = Switch("ATOKEN_CUDA_GRAPHS", ("auto", "on", "off"), "CUDA graph mode")


def set_cuda_graphs(mode: str) -> None:
    _mode.set(mode)


class GraphCaptureError(ATokenError):
    """Capturing a bucket's graph failed (a kernel that cannot be captured): run eagerly instead."""


def graphed_encoder(model: AToken) -> "BucketedEncoder | None":
    """The bucketed, graph-captured encoder a served model runs its batches through, or None
    (eager), as ATOKEN_CUDA_GRAPHS says."""
    if _mode.value == "off":
        return None
    usable = next(model.parameters()).device.type == "cuda" and flash_available()
    if _mode.value == "on" and not usable:
        raise ConfigError("ATOKEN_CUDA_GRAPHS=on needs the model on a CUDA device and flash-attn installed")
    return BucketedEncoder(model, capture=True) if usable else None


@dataclass(frozen=True)
class StaticSegments(Segments):
    """Segments whose boundaries live in a device tensor (for graph replay): flash backend only."""

    static_cu: Tensor | None = field(default=None, compare=False)
    static_max: int = 0

    @cached_property
    def cu_seqlens(self) -> Tensor:
        return self.static_cu

    @cached_property
    def max_len(self) -> int:
        return self.static_max


@dataclass
class Padded:
    feats: Tensor  # [T, 3072] in segment order, padding last
    pos: Tensor  # [T, C]
    rope: Tensor  # [T, D/2] complex
    cu_seqlens: Tensor  # [items + 2] int32 (real segments, the padding segment, then repeats)
    sample: Tensor  # [T] pooling owner; padding -> the spare slot `items`
    lengths: tuple[int, ...]
    real_tokens: int
    layout: TokenLayout


class BucketedEncoder:
    def __init__(self, model: AToken, buckets=DEFAULT_BUCKETS, capture: bool | None = None):
        self.model = model.eval()
        self.buckets = sorted(buckets)
        device = next(model.parameters()).device
        self.capture = capture if capture is not None else (device.type == "cuda" and flash_available())
        self.graphs: dict[tuple[int, int], tuple[torch.cuda.CUDAGraph, dict]] = {}

    def fits(self, batch: SparseBatch) -> bool:
        return batch.batch_size <= self.buckets[-1][0] and batch.num_tokens < self.buckets[-1][1]

    def bucket_for(self, items: int, tokens: int) -> tuple[int, int]:
        for b in self.buckets:
            if items <= b[0] and tokens < b[1]:  # at least one padding token
                return b
        raise TokenLimitError(f"batch of {items} items / {tokens} tokens exceeds the largest bucket {self.buckets[-1]}",
                              limit=self.buckets[-1][1], actual=tokens)

    def pad(self, batch: SparseBatch, bucket: tuple[int, int]) -> Padded:
        enc = self.model.encoder
        width = self.model.cfg.in_channels
        layout = self.model.layout(batch, (width, enc.short_input))
        items, tokens = bucket
        n = batch.num_tokens
        dtype = self.model.proj.weight.dtype
        device = self.model.proj.weight.device
        feats = torch.zeros(tokens, width, dtype=dtype, device=device)  # one captured width: short inputs padded
        feats[:n, : batch.feats.shape[1]] = layout.to_segment_order(batch.feats.to(device=device, dtype=dtype))
        pos = torch.zeros(tokens, enc.cfg.model_channels, dtype=dtype, device=device)
        pos[:n] = enc.pos_embedder(layout.xy[:, 0], layout.xy[:, 1], layout.sample, layout.grid_sizes).to(dtype)
        rope = torch.ones(tokens, enc.cfg.head_dim // 2, dtype=torch.complex64, device=device)
        rope[:n] = layout.rope(enc.cfg.head_dim)
        lengths = layout.segments.lengths + (tokens - n,)
        # Fixed-size cu_seqlens for the graph: unused trailing segments have zero length.
        cu = torch.zeros(items * 4 + 2, dtype=torch.int32, device=device)  # room for temporal tiles
        cu[1:len(lengths) + 1] = torch.tensor(lengths, device=device).cumsum(0)
        cu[len(lengths) + 1:] = tokens
        sample = torch.full((tokens,), items, dtype=torch.long, device=device)
        sample[:n] = layout.sample
        return Padded(feats, pos, rope, cu, sample, lengths, n, layout)

    def _forward(self, p: Padded, items: int, seg: Segments) -> tuple[Tensor, Tensor, Tensor]:
        enc = self.model.encoder
        x = enc.input_layer(p.feats) + p.pos
        for block in enc.blocks:
            x = block(x, seg, p.rope)
        x = enc.post_layernorm(x)
        pooled = enc.head(x, p.sample, items + 1)[:items]
        return x, self.model.proj(x), pooled

    def encode(self, batch: SparseBatch) -> EncoderOutput:
        bucket = self.bucket_for(batch.batch_size, batch.num_tokens)
        p = self.pad(batch, bucket)
        if self.capture:
            x, posterior, pooled = self._replay(bucket, p)
        else:
            x, posterior, pooled = self._forward(p, bucket[0], Segments(p.lengths, p.feats.device))
        n, b = p.real_tokens, batch.batch_size
        layout = p.layout
        pooled = pooled[:b]
        return EncoderOutput(layout.to_input_order(x[:n]), layout.to_input_order(posterior[:n]), pooled,
                             F.normalize(pooled.float(), dim=-1))

    def _replay(self, bucket: tuple[int, int], p: Padded):  # pragma: no cover - CUDA only
        if bucket not in self.graphs:
            try:
                self.graphs[bucket] = self._capture(bucket, p)
            except Exception as exc:  # noqa: BLE001 - whatever the kernel raised while capturing
                raise GraphCaptureError(f"CUDA graph capture of bucket {bucket} failed: {exc}") from exc
        graph, static = self.graphs[bucket]
        for name in ("feats", "pos", "rope", "cu_seqlens", "sample"):
            static[name].copy_(getattr(p, name))
        graph.replay()
        return static["x"], static["posterior"], static["pooled"]

    def _capture(self, bucket: tuple[int, int], p: Padded):  # pragma: no cover - CUDA only
        static = {name: getattr(p, name).clone() for name in ("feats", "pos", "rope", "cu_seqlens", "sample")}
        padded = Padded(static["feats"], static["pos"], static["rope"], static["cu_seqlens"], static["sample"],
                        p.lengths, p.real_tokens, p.layout)
        seg = StaticSegments((bucket[1],), p.feats.device, static_cu=static["cu_seqlens"], static_max=bucket[1])
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.inference_mode():
            for _ in range(2):  # warm-up outside the graph
                self._forward(padded, bucket[0], seg)
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.inference_mode():
            static["x"], static["posterior"], static["pooled"] = self._forward(padded, bucket[0], seg)
        return graph, static
