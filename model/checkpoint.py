"""Official `.pt` and `.safetensors` state dicts in, our safetensors checkpoints out.

Loading is strict: every missing key, unexpected key and shape mismatch is named in one
CheckpointError. `.pt` files are read with `weights_only=True` (no pickled code runs).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .errors import CheckpointError

# Keys the official training wrappers add that play no part in inference (torchmetrics
# LPIPS inside the GS decoder checkpoint, for instance).
IGNORED_PREFIXES = ("lpips_loss.", "ssim_loss.", "psnr_loss.", "msssim_loss.", "loss.", "discriminator.")
WRAPPER_PREFIXES = ("module.", "model.", "_orig_mod.")
NESTED_KEYS = ("state_dict", "model", "module", "ema", "model_ema")


def read_state_dict(path: str | Path) -> dict[str, Tensor]:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            return load_file(str(path))
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except CheckpointError:
        raise
    except Exception as exc:  # noqa: BLE001 - any reader failure is a bad checkpoint
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from None
    return _unwrap(obj, path)


def _unwrap(obj: Any, path: Path) -> dict[str, Tensor]:
    while isinstance(obj, Mapping) and not all(isinstance(v, Tensor) for v in obj.values()):
        inner = next((obj[k] for k in NESTED_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
        if inner is None:
            raise CheckpointError(f"{path}: no state dict found (top-level keys {sorted(obj)[:10]})")
        obj = inner
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path}: expected a state dict, got {type(obj).__name__}")
    return dict(obj)


def normalize_keys(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Strip wrapper prefixes (DDP `module.`, `_orig_mod.`) and drop training-only keys."""
    out = {}
    for key, value in state.items():
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key = key[len(prefix):]
        if not key.startswith(IGNORED_PREFIXES):
            out[key] = value
    return out


def load_into(module: nn.Module, state: Mapping[str, Tensor], source: str = "checkpoint") -> None:
    """Strictly copy `state` into `module`; raise CheckpointError naming every mismatch."""
    state = normalize_keys(state)
    expected = module.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(expected[k].shape)}"
        for k in set(state) & set(expected) if state[k].shape != expected[k].shape
    )
    if missing or unexpected or wrong:
        lines = [f"{source} does not match the model config:"]
        lines += [f"  missing key {k}" for k in missing]
        lines += [f"  unexpected key {k}" for k in unexpected]
        lines += [f"  wrong shape {w}" for w in wrong]
        raise CheckpointError("\n".join(lines))
    module.load_state_dict(dict(state), strict=True)


def save_safetensors(module: nn.Module, path: str | Path, metadata: Mapping[str, Any],
                     dtype: torch.dtype | None = None) -> None:
    """Our checkpoint format: the state dict plus JSON metadata (config, model card). With
    `dtype`, floating tensors are stored in it (e.g. float16 to halve a shipped file); loading
    casts them back to the model's dtype."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in module.state_dict().items()}
    if dtype is not None:
        tensors = {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=meta)


def read_metadata(path: str | Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as f:
            raw = f.metadata() or {}
    except Exception as exc:  # noqa: BLE001
        raise CheckpointError(f"cannot read metadata of {path}: {exc}") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()
