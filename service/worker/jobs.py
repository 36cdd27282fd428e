"""What travels between the front end and the model worker: plain tensors and strings
(picklable, so the worker can live in another process or behind Triton). Images and videos
travel as uint8 pixel patches, made float on the worker's side."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from model.api import Tokens
from model.layers.attention import PoolState
from model.config import PATCH_SIZE, PATCH_VALUES
from model.patchify import grid_coords, voxel_coords, voxels_to_sparse
from model.sparse import SparseBatch, cat

TUBELET = PATCH_SIZE[0]
FRAME_VALUES = PATCH_VALUES // TUBELET  # 768: one frame of a tubelet

# "pool" finishes an embedding from the merged pooling states of a long video's tiles.
Op = Literal["embed", "tokenize", "reconstruct", "decode", "pool"]
ENCODER_OPS = ("embed", "tokenize", "reconstruct")
DECODER_OPS = ("reconstruct", "decode")


def pixel_patches(frames: np.ndarray) -> SparseBatch:
    """uint8 frames [T, h, w, 3] (h, w multiples of 16; T = 1 or T % 4 == 0) -> one item of
    uint8 tubelet patches, laid out as `model.patchify.patchify_frames` lays them out.

    An image (T = 1) travels as [n, 768], its frame alone: the three zero frames the official
    preprocessing pads it with are added by `model_feats` on the worker's side. A video travels
    as [n, 3072]. Either way a quarter of the float32 bytes (a sixteenth for images), exactly
    the values `x / 127.5 - 1` would give. Cut in numpy with one copy: decoders hand out
    read-only arrays, and an image is never widened to four frames to keep one."""
    t, h, w, c = frames.shape
    depth = 1 if t == 1 else TUBELET
    nt, nh, nw = t // depth, h // PATCH_SIZE[1], w // PATCH_SIZE[2]
    tubelets = frames.reshape(nt, depth, nh, PATCH_SIZE[1], nw, PATCH_SIZE[2], c).transpose(0, 2, 4, 1, 3, 5, 6)
    feats = torch.from_numpy(np.array(tubelets, order="C").reshape(nt * nh * nw, -1))
    coords = grid_coords(nt, nh, nw)
    coords = torch.cat([torch.zeros_like(coords[:, :1]), coords], 1)
    return SparseBatch(feats, coords, ("image" if t == 1 else "video",))


def voxel_patches(coords: np.ndarray, feats: np.ndarray) -> SparseBatch:
    """One 3D item: coords [V, 3] (x, y, z) on the 64^3 grid, feats [V, 768] float in [0, 1].

    A voxel's tubelet is its patch then zeros, as an image's is its frame then zeros. Features
    that are whole 255ths (every mesh, views upload and uint8 volume: the patches of 8-bit
    renders) travel as those uint8 levels, [V, 768], and become `u / 127.5 - 1` on the worker,
    bit for bit the official `2f - 1` (both round 2u/255 once). That is a sixteenth of the
    float32 tubelets the official packing makes: 15 MB instead of 245 for 20,000 voxels, which
    fit the worker's shared-memory arena instead of being pickled through its pipe. Other
    floats go as the official packing makes them."""
    levels = feats * np.float32(255)  # [V, 768] float32, rounded in place: two buffers of it at most
    np.rint(levels, out=levels)
    if not np.array_equal(levels / np.float32(255), feats):
        return voxels_to_sparse([(torch.from_numpy(coords), torch.from_numpy(feats))])
    return SparseBatch(torch.from_numpy(levels.astype(np.uint8)), voxel_coords(torch.from_numpy(coords)), ("3D",))


def model_feats(batch: SparseBatch) -> SparseBatch:
    """uint8 patches (from `pixel_patches`) -> the model's float32 input in [-1, 1] at full
    width; float batches (3D, or built by model.patchify) pass through."""
    if batch.feats.dtype != torch.uint8:
        return batch
    return batch.with_feats(_full_width(_to_model_range(batch.feats)))  # always full: it may meet videos


def packed_input(batches: list[SparseBatch]) -> SparseBatch:
    """Jobs' inputs -> one packed model input. uint8 patches of one width are joined first and
    made float once; images then stay [n, 768], without the three zero frames (the encoder
    knows they are zeros). Anything else is joined at full width."""
    widths = {b.feats.shape[1] for b in batches}
    if len(widths) == 1 and all(b.feats.dtype == torch.uint8 for b in batches):
        packed = cat(batches)
        return packed.with_feats(_to_model_range(packed.feats))
    return cat([model_feats(b) for b in batches])


def _to_model_range(feats: Tensor) -> Tensor:
    return feats.to(torch.float32).div_(127.5).sub_(1.0)  # in place: no second buffer to fault in


def _full_width(feats: Tensor) -> Tensor:
    """An image's one frame -> its tubelet: the frame, then zero frames."""
    if feats.shape[1] * TUBELET != PATCH_VALUES:
        return feats  # already whole (or malformed: the model names the problem)
    return torch.cat([feats, feats.new_zeros(feats.shape[0], PATCH_VALUES - feats.shape[1])], 1)


# What an empty place in a reconstruction's token grid becomes as a pixel: a float 0 is 128.
PIXEL_FILL = 128


def reconstruction_pixels(tubelets: Tensor, kind: str) -> Tensor:
    """A float reconstruction [n, 3072] -> the uint8 values the front end would make of it
    (clamped to [-1, 1], then rounded as `media.image.from_model_range`), so that only those
    travel back: [n, 768] for an image (frame 0 of each tubelet, the frame it keeps), [n, 3072]
    for a video. A sixteenth of the float bytes for an image, a quarter for a video."""
    from ..media.image import from_model_range  # the one rounding rule, shared with the front end

    if kind == "image":
        tubelets = tubelets[:, :FRAME_VALUES]
    return torch.from_numpy(from_model_range(tubelets.float().clamp(-1, 1).numpy()))


@dataclass
class Job:
    id: int
    op: Op
    mode: Literal["continuous", "discrete"] = "continuous"
    dense: bool = False  # embed: also return per-token features
    gaussians: bool = False  # decode/reconstruct of 3D items: run the Gaussian decoder
    batch: SparseBatch | None = None  # one item's tubelets (batch index 0; uint8 pixels or float), encoder ops
    tokens: Tokens | None = None  # one item's tokens (batch index 0), decode
    partial: bool = False  # embed: return the pooling state of this piece, not an embedding
    embedding: bool = False  # tokenize/reconstruct: also return the global embedding (embed jobs always do)
    pool_state: PoolState | None = None  # pool: the merged state of every piece ([1, H], [1, H], [1, H, D])
    pixels: bool = False  # decoder ops: images' and videos' tubelets come back as `reconstruction_pixels` (3D: float)

    @property
    def pools(self) -> bool:
        """Whether this job needs the attention-pooling head (an embedding or a pooling state)."""
        return self.op == "embed" or self.partial or self.embedding

    @property
    def pixels_width(self) -> int:
        """The width of the uint8 rows a decoder op with `pixels` gets back (`reconstruction_pixels`):
        an image's one frame, a video's tubelet; 0 where floats (3D) or no pixels come back."""
        if not self.pixels or self.tubelet_kind in (None, "3D"):
            return 0
        return self.tubelet_width

    @property
    def tubelet_width(self) -> int:
        """The width of the decoded rows a decoder op gets back (0 for other ops): an image shown
        as pixels keeps its one frame and a 3D item its voxel's 768 features (all that its PLY,
        npz and Gaussians read), so the decoder makes no more; the rest whole tubelets."""
        kind = self.tubelet_kind
        if kind is None:
            return 0
        return FRAME_VALUES if kind == "3D" or (kind == "image" and self.pixels) else PATCH_VALUES

    @property
    def tubelet_kind(self) -> str | None:
        """The kind of the item a decoder op decodes (None for other ops)."""
        source = self.batch if self.batch is not None else self.tokens
        return None if source is None or self.op not in DECODER_OPS else source.kinds[0]

    @property
    def model_mode(self) -> str:
        """Which token mode's tokenizer runs this job (decoding indices needs the quantizer's)."""
        if self.op == "decode":
            return "discrete" if self.tokens.indices is not None else "continuous"
        return self.mode

    @property
    def num_tokens(self) -> int:
        if self.op == "pool":
            return 1
        source = self.batch.coords if self.batch is not None else self.tokens.coords
        return int(source.shape[0])

    @property
    def cost(self) -> int:
        """Compute cost in token passes: encoder and decoder each count once."""
        passes = (self.op in ENCODER_OPS) + (self.op in DECODER_OPS)
        return max(1, self.num_tokens * passes)


@dataclass(frozen=True)
class WorkPrice:
    """What a job's token passes cost in time on one worker, in units of a short sequence's
    encoder token pass (the worker's rate is measured in them, `calibrate`):

    * attention: each token of an n-token sequence costs 1 + n / `crossover`, so a long 3D
      asset's time, unlike its memory, grows with the square of its tokens;
    * `decoder`: a decoder pass, in encoder passes (measured at start: the shipped model's
      decoder, with qk-norm and exact softmax, takes 1.1-1.5 of them in bfloat16 on AMX and
      1.0-1.1 in float32 on AVX2)."""

    crossover: float = float("inf")
    decoder: float = 1.0

    @classmethod
    def of(cls, info: dict) -> "WorkPrice":
        """From a worker's info (`ready_info`); a stand-in without a model counts token passes."""
        work = info.get("work") or {}
        return cls(attention_crossover(info.get("encoder")), work.get("decoder_pass", 1.0))

    def __call__(self, job: Job) -> float:
        passes = (job.op in ENCODER_OPS) + self.decoder * (job.op in DECODER_OPS)
        return max(1, job.num_tokens) * max(passes, 1) * (1 + job.num_tokens / self.crossover)


def linear_flops(transformer: dict) -> int:
    """A token's FLOPs in the linear layers of a transformer (as /info shows its config)."""
    d, m = transformer["model_channels"], transformer["mlp_channels"]
    return 2 * (4 * d * d + 2 * d * m) * transformer["num_blocks"]


def attention_crossover(encoder: dict | None) -> float:
    """The sequence length at which a token's attention costs what its linear layers cost. Per
    block, a token's linears take 2 (4 d^2 + 2 d m) FLOPs (qkv, output, the MLP's two), its
    attention over n tokens 4 n d (scores, then values): equal at n = 2 d + m. On the shipped
    model's encoder the rate this gives stayed within 0.83-1 of its rate at 1,024 tokens from 256
    to 16,384 tokens, and fell to 0.74-0.78 at 25,600 (docs/limits.md): low, so towards running.
    Without a model described (a stand-in backend), attention is not counted."""
    if not encoder:
        return float("inf")
    return 2 * encoder["model_channels"] + encoder["mlp_channels"]


@dataclass
class JobResult:
    id: int
    embedding: Tensor | None = None  # [C]
    features: Tensor | None = None  # [n, C]
    tokens: Tokens | None = None
    tubelets: Tensor | None = None  # [n, 3072] reconstruction, same coords as the input (uint8 if Job.pixels)
    gaussians: dict[str, Tensor] | None = None  # raw Gaussian fields (see model.gaussians)
    pool_state: PoolState | None = None  # partial embed jobs
    error: tuple[str, str] | None = None  # (error class name, message)
    compute_ms: float = 0.0
    extra: dict = field(default_factory=dict)
