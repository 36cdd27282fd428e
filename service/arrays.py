"""Arrays in JSON ({"dtype", "shape", "data"} with data as base64 or nested lists) and in the
binary formats clients ask for with Accept: safetensors and .npy."""

from __future__ import annotations

import base64
import io
import json
import math

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from .errors import BadRequest, NonFiniteOutput

DTYPES = {"float32", "float16", "int32", "int64", "uint16", "uint8", "int16"}
SAFETENSORS = "application/vnd.safetensors"
NPY = "application/x-npy"


def finite_list(arr: np.ndarray, name: str) -> list:
    """arr.tolist() for a JSON answer. JSON has no NaN or infinity (the standard library
    refuses them, orjson writes null), so a model output holding one is an error, not data."""
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        raise NonFiniteOutput(f"the model produced NaN or infinite values in {name}")
    return arr.tolist()


def array_to_json(arr: np.ndarray, fmt: str = "base64", name: str = "an array") -> dict:
    arr = np.ascontiguousarray(arr)
    out = {"dtype": str(arr.dtype), "shape": list(arr.shape)}
    if fmt == "list":
        out["data"] = finite_list(arr, name)
    else:
        out["data"] = base64.b64encode(arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()).decode()
    return out


def array_from_json(obj, name: str) -> np.ndarray:
    """{"dtype", "shape", "data"} -> an array; an array (from a safetensors body) passes through.
    The declared size must match the data before anything is decoded."""
    if isinstance(obj, np.ndarray):
        return obj
    if not isinstance(obj, dict) or not {"dtype", "shape", "data"} <= set(obj):
        raise BadRequest(f"{name} must be an object with dtype, shape and data")
    dtype, shape = obj["dtype"], obj["shape"]
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise BadRequest(f"{name}: dtype {dtype!r} unsupported; one of {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 4 or not all(
            isinstance(s, int) and not isinstance(s, bool) and s >= 0 for s in shape):
        raise BadRequest(f"{name}: shape must be a list of at most 4 non-negative integers")
    data = obj["data"]
    if isinstance(data, str) and len(data) != 4 * math.ceil(math.prod(shape) * np.dtype(dtype).itemsize / 3):
        raise BadRequest(f"{name}: {len(data)} base64 characters do not hold a {dtype} array of shape {shape}")
    if not isinstance(data, (str, list)):
        raise BadRequest(f"{name}: data must be a base64 string or nested lists")
    try:
        if isinstance(data, str):
            raw = base64.b64decode(data, validate=True)
            arr = np.frombuffer(raw, dtype=np.dtype(dtype).newbyteorder("<")).astype(dtype)
        else:
            arr = np.asarray(obj["data"], dtype=dtype)
        return arr.reshape(shape)
    except (ValueError, TypeError) as exc:
        raise BadRequest(f"{name}: data does not match dtype {dtype} and shape {shape} ({exc})") from None


def to_safetensors(arrays: dict[str, np.ndarray], metadata: dict) -> bytes:
    return st_save({k: np.ascontiguousarray(v) for k, v in arrays.items()},
                   metadata={"json": json.dumps(metadata)})


def from_safetensors(data: bytes) -> tuple[dict[str, np.ndarray], dict]:
    try:
        arrays = st_load(data)
        header_len = int.from_bytes(data[:8], "little")
        header = json.loads(data[8:8 + header_len])
        meta = json.loads(header.get("__metadata__", {}).get("json", "{}"))
    except Exception as exc:  # noqa: BLE001
        raise BadRequest(f"body is not a valid safetensors file: {exc}") from None
    return arrays, meta


def to_npy(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr, allow_pickle=False)
    return buf.getvalue()
