"""Which model to serve, and loading it: a configured checkpoint, else the default model that
ships with the project, else an untrained `tiny` (said loudly in /info and the logs)."""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from model.api import ATokenizer
from model.config import GS_VARIANTS

log = logging.getLogger("atoken.worker")
ASSETS = Path(__file__).resolve().parents[1] / "assets"
DEFAULT_CHECKPOINT = ASSETS / "default.safetensors"
DEFAULT_GS_CHECKPOINT = ASSETS / "default_gs.safetensors"
DEFAULT_DISCRETE_CHECKPOINT = ASSETS / "default_fsq.safetensors"


@dataclass(frozen=True)
class ModelSpec:
    checkpoint: str | None = None
    config: str | None = None  # official YAML or a variant name
    variant: str | None = None  # no checkpoint: serve this variant randomly initialised (tests, benchmarks)
    gs_checkpoint: str | None = None
    gs_config: str | None = None
    dtype: str = "float32"  # or auto: resolved where the model is loaded (resolve_dtype)
    device: str = "cpu"
    threads: int = 0  # 0 = torch's default
    # A second tokenizer for tokens=discrete, when the first has no quantizer (the default
    # model ships one: default_fsq.safetensors, the FSQ fine-tune of the continuous default).
    discrete_checkpoint: str | None = None
    discrete_config: str | None = None
    lanes: int = 0  # batches cut into this many single-threaded parts; 0: one per core on a CPU, 1 elsewhere

    @property
    def engine_lanes(self) -> int:
        if self.lanes:
            return self.lanes
        return (self.threads or torch.get_num_threads()) if self.device == "cpu" else 1


def cpu_has_bf16() -> bool:
    """Native bfloat16 matrix units on this CPU (AVX512-BF16 or AMX-BF16; read on Linux)."""
    return _cpu_flag(r"avx512_bf16|amx_bf16")


def cpu_has_fp16() -> bool:
    """Native float16 arithmetic on this CPU (AVX512-FP16 or AMX-FP16; read on Linux)."""
    return _cpu_flag(r"avx512_fp16|amx_fp16")


def _cpu_flag(names: str) -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return re.search(rf"\b({names})\b", flags) is not None


@functools.cache
def _warn_emulated(dtype: str) -> None:
    """Once a process and dtype: each token mode's model resolves its dtype."""
    # Served as asked, but emulated: on a CPU with bf16 units and no fp16 a 256x256 image took
    # 86 ms in float16 on one thread against 18 in float32 and 7 in bfloat16; on an AVX2 CPU
    # (neither) 330-360 ms in bfloat16 against 38 in float32.
    log.warning("ATOKEN_DTYPE=%s on a CPU without %s units is emulated and several times slower "
                "than float32; use auto or float32", dtype, dtype)


def resolve_dtype(dtype: str, device: str) -> str:
    """`auto`: bfloat16 where the hardware computes it natively (GPUs that support it, CPUs
    with bf16 units), float32 elsewhere. Accuracy against float32 is bounded in
    docs/performance.md and tests/service/worker/test_dtype.py."""
    has_units = {"float16": cpu_has_fp16, "bfloat16": cpu_has_bf16}.get(dtype)
    if device == "cpu" and has_units is not None and not has_units():
        _warn_emulated(dtype)
    if dtype != "auto":
        return dtype
    if device.startswith("cuda"):
        return "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    return "bfloat16" if device == "cpu" and cpu_has_bf16() else "float32"


def load_tokenizer(spec: ModelSpec) -> ATokenizer:
    spec = replace(spec, dtype=resolve_dtype(spec.dtype, spec.device))
    if spec.threads:
        torch.set_num_threads(spec.threads)
    if spec.checkpoint:
        tok = ATokenizer.load(spec.checkpoint, spec.config, spec.gs_checkpoint, spec.gs_config, spec.dtype,
                              spec.device)
    elif spec.variant:
        log.warning("serving variant %s with random weights (ATOKEN_VARIANT)", spec.variant)
        tok = ATokenizer.from_variant(spec.variant, seed=0, gs=GS_VARIANTS["gs-tiny"])
        tok.to(device=spec.device, dtype=spec.dtype)
    elif DEFAULT_CHECKPOINT.is_file():
        gs = DEFAULT_GS_CHECKPOINT if DEFAULT_GS_CHECKPOINT.is_file() else None
        tok = ATokenizer.load(DEFAULT_CHECKPOINT, gs_checkpoint=gs, dtype=spec.dtype, device=spec.device)
    else:
        log.warning("no checkpoint configured and no default model shipped: serving an UNTRAINED tiny model")
        tok = ATokenizer.from_variant("tiny", seed=0, gs=GS_VARIANTS["gs-tiny"])
        tok.to(device=spec.device, dtype=spec.dtype)
    if not tok.info.trained:
        log.warning("model %s is untrained: outputs are not meaningful", tok.info.variant)
    return tok


def load_tokenizers(spec: ModelSpec) -> dict[str, ATokenizer]:
    """The tokenizer for each token mode: {"continuous": ..., "discrete": ...}. A model with a
    quantizer serves both modes; otherwise a separate discrete tokenizer, if one is configured
    (or shipped, for the default model), serves tokens=discrete. `auto` dtypes are resolved
    here, on the machine that runs the model (a Ray driver may have no GPU, its actors do)."""
    spec = replace(spec, dtype=resolve_dtype(spec.dtype, spec.device))
    tok = load_tokenizer(spec)
    tokenizers = {"continuous": tok}
    gs = spec.gs_checkpoint or (str(DEFAULT_GS_CHECKPOINT) if DEFAULT_GS_CHECKPOINT.is_file() else None)
    if tok.supports_discrete:
        tokenizers["discrete"] = tok
    elif spec.discrete_checkpoint:
        tokenizers["discrete"] = ATokenizer.load(spec.discrete_checkpoint, spec.discrete_config, gs, spec.gs_config,
                                                 spec.dtype, spec.device)
    elif not spec.checkpoint and not spec.variant and DEFAULT_DISCRETE_CHECKPOINT.is_file():
        tokenizers["discrete"] = ATokenizer.load(DEFAULT_DISCRETE_CHECKPOINT, gs_checkpoint=gs, dtype=spec.dtype,
                                                 device=spec.device)
    return tokenizers
