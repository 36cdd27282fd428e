"""Two-layer MLP with tanh-approximated GELU; keys `mlp.0` / `mlp.2` as in the official code.

On a CPU the first projection and its GELU can run as one oneDNN call, the GELU applied to the
matmul's float32 accumulator before it is rounded (what inductor emits for this pattern). PyTorch's
own tanh-GELU kernel costs 2-5x the projection it follows in bfloat16 on CPUs (3.5 ms against
0.7 ms for the erf GELU on a [1024, 1024] tensor); fused, the pair costs about 40% of the two
calls. In float32 the plain pair is the faster: on an AVX2 CPU oneDNN's GELU post-op took the
fused call to 28-31 ms on [2048, 256] x [256, 1024], one thread, against 14 + 7.7 ms for the
two (the encoder pass 1.06-1.10x faster plain). Inference only (the fused op has no gradient).

``ATOKEN_FUSED_MLP`` (auto|on|off) or `set_fused_mlp` picks; ``auto`` fuses bfloat16 where
oneDNN offers it, ``on`` float32 too. The plain path is the oracle the fused one is tested against.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import ConfigError
from .switch import Switch

MODES = ("auto", "on", "off")
_mode = Switch("ATOKEN_FUSED_MLP", MODES, "fused MLP mode")


def set_fused_mlp(mode: str) -> None:
    _mode.set(mode)


@functools.cache  # asked on every MLP call: the answer never changes in a process
def fused_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@functools.cache
def fused_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN can fuse on this CPU: its bfloat16 inner product needs AVX512 or
    newer (on an AVX2-only CPU it fails to create the primitive at the first call)."""
    if not fused_available():
        return ()
    return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)


def _fuse(x: Tensor) -> bool:
    if _mode.value == "off" or x.device.type != "cpu" or torch.is_grad_enabled():
        return False
    fusable = x.dtype in fused_dtypes()
    if _mode.value == "auto":
        return fusable and x.dtype == torch.bfloat16
    if not fusable and x.dtype in (torch.float32, torch.bfloat16):
        raise ConfigError(f"ATOKEN_FUSED_MLP=on needs oneDNN's fused {x.dtype} linear, which this "
                          "PyTorch build or CPU lacks (bfloat16 needs AVX512 or newer)")
    return fusable


def linear_gelu_tanh(x: Tensor, weight: Tensor, bias: Tensor | None, fused: bool) -> Tensor:
    """gelu_tanh(x @ weight.T + bias). x: [..., in]; weight: [out, in]; bias: [out] or None."""
    if fused:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "gelu", [], "tanh")
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


class Mlp(nn.Module):
    def __init__(self, channels: int, hidden: int, bias: bool = True):
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(channels, hidden, bias=bias),
            nn.GELU(approximate="tanh"),
            nn.Linear(hidden, channels, bias=bias),
        )

    def forward(self, x: Tensor) -> Tensor:
        fc1, _, fc2 = self.mlp
        return fc2(linear_gelu_tanh(x, fc1.weight, fc1.bias, _fuse(x)))
