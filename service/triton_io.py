"""The wire format between the front end and the Triton model: one request per job, plain
named tensors (batch dimension 1), so Triton's dynamic batcher can group requests of any
length (ragged) and the model packs them into one forward pass."""

from __future__ import annotations

import json

import numpy as np
import torch

from model.api import Tokens
from model.layers.attention import PoolState
from model.sparse import SparseBatch

from .worker.engine import GAUSSIAN_FIELDS
from .worker.jobs import Job, JobResult, model_feats

OUTPUTS = ("EMBEDDING", "FEATURES", "LATENTS", "LOGVAR", "INDICES_OUT", "TUBELETS", "GAUSSIANS", "ERROR")


def pack_json(obj) -> np.ndarray:
    """JSON as a [1, n] uint8 array (plain numbers travel more reliably than BYTES tensors)."""
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)[None].copy()


def unpack_json(arr: np.ndarray):
    raw = np.ascontiguousarray(arr).astype(np.uint8).tobytes()
    try:
        return json.loads(raw.decode())
    except ValueError:
        raise ValueError(f"bad JSON payload: shape {arr.shape} dtype {arr.dtype} head {raw[:40]!r}") from None


def job_to_inputs(job: Job) -> dict[str, np.ndarray]:
    """Named arrays for one job (leading batch dimension 1)."""
    meta = {"op": job.op, "mode": job.mode, "dense": job.dense, "gaussians": job.gaussians, "partial": job.partial}
    if job.pool_state is not None:  # a few hundred floats: they ride in the JSON
        meta["pool_state"] = _state_to_json(job.pool_state)
    pixels = None
    if job.op == "pool":
        coords, kind, feats = torch.zeros(0, 5, dtype=torch.int32), "video", np.zeros((0, 0), np.float32)
    elif job.batch is not None and job.batch.feats.dtype == torch.uint8:
        # Pixels travel as the uint8 patches they are (a quarter of the float bytes, a
        # sixteenth for images); the model side makes them float as the process worker does.
        coords, kind = job.batch.coords, job.batch.kinds[0]
        feats, pixels = np.zeros((coords.shape[0], 0), np.float32), job.batch.feats.numpy()
    elif job.batch is not None:
        coords, kind = job.batch.coords, job.batch.kinds[0]
        feats = model_feats(job.batch).feats.float().numpy()
    else:
        coords, kind = job.tokens.coords, job.tokens.kinds[0]
        feats = (job.tokens.latents.float().numpy() if job.tokens.latents is not None
                 else np.zeros((coords.shape[0], 0), np.float32))
    meta["kind"] = kind
    indices = job.tokens.indices.numpy() if job.tokens is not None and job.tokens.indices is not None \
        else np.zeros((coords.shape[0], 0), np.int64)
    return {
        "META": pack_json(meta),
        "FEATS": feats[None].astype(np.float32),
        "PIXELS": (pixels if pixels is not None else np.zeros((coords.shape[0], 0), np.uint8))[None],
        "COORDS": coords.numpy().astype(np.int32)[None],
        "INDICES": indices.astype(np.int64)[None],
    }


def inputs_to_job(job_id: int, arrays: dict[str, np.ndarray]) -> Job:
    meta = unpack_json(arrays["META"])
    coords = torch.from_numpy(np.ascontiguousarray(arrays["COORDS"][0])).to(torch.int32)
    feats = torch.from_numpy(np.ascontiguousarray(arrays["FEATS"][0]))
    pixels = arrays.get("PIXELS")
    if pixels is not None and pixels.shape[-1]:
        feats = torch.from_numpy(np.ascontiguousarray(pixels[0]))
    indices = arrays["INDICES"][0]
    kind = meta["kind"]
    if meta["op"] == "pool":
        return Job(job_id, "pool", meta["mode"], pool_state=_state_from_json(meta["pool_state"]))
    if meta["op"] == "decode":
        tokens = (Tokens(coords, (kind,), indices=torch.from_numpy(np.ascontiguousarray(indices)))
                  if indices.shape[1] else Tokens(coords, (kind,), latents=feats))
        return Job(job_id, "decode", meta["mode"], meta["dense"], meta["gaussians"], tokens=tokens)
    return Job(job_id, meta["op"], meta["mode"], meta["dense"], meta["gaussians"],
               batch=SparseBatch(feats, coords, (kind,)), partial=meta.get("partial", False))


def _state_to_json(state: PoolState) -> dict:
    return {f: getattr(state, f).tolist() for f in ("peak", "total", "weighted")}


def _state_from_json(obj: dict) -> PoolState:
    return PoolState(*(torch.tensor(obj[f], dtype=torch.float32) for f in ("peak", "total", "weighted")))


def _arr(t, dtype, dims: int) -> np.ndarray:
    if t is None:
        return np.zeros((1,) + (0,) * dims, dtype)
    return t.numpy().astype(dtype)[None]


def result_to_outputs(r: JobResult) -> dict[str, np.ndarray]:
    tokens = r.tokens
    g = r.gaussians
    gauss = (np.concatenate([g[k].reshape(g[k].shape[0], -1).numpy() for k in GAUSSIAN_FIELDS], 1)
             if g else np.zeros((0, 14), np.float32))
    meta = {"error": r.error, "compute_ms": r.compute_ms}
    if r.pool_state is not None:
        meta["pool_state"] = _state_to_json(r.pool_state)
    if g:
        meta.update({k: g[k] for k in ("scaling_bias", "opacity_bias", "filter_3d")})
    return {
        "EMBEDDING": _arr(r.embedding, np.float32, 1),
        "FEATURES": _arr(r.features, np.float32, 2),
        "LATENTS": _arr(tokens.latents if tokens else None, np.float32, 2),
        "LOGVAR": _arr(tokens.logvar if tokens else None, np.float32, 2),
        "INDICES_OUT": _arr(tokens.indices if tokens else None, np.int64, 2),
        "TUBELETS": _arr(r.tubelets, np.float32, 2),
        "GAUSSIANS": gauss.astype(np.float32)[None],
        "ERROR": pack_json(meta),
    }


def outputs_to_result(job: Job, out: dict[str, np.ndarray]) -> JobResult:
    meta = unpack_json(out["ERROR"])
    r = JobResult(job.id, compute_ms=meta.get("compute_ms", 0.0))
    if meta.get("error"):
        r.error = tuple(meta["error"])
        return r
    if meta.get("pool_state"):
        r.pool_state = _state_from_json(meta["pool_state"])
    t = lambda name: torch.from_numpy(np.array(out[name][0]))  # noqa: E731 - a writable copy
    if out["EMBEDDING"].size:
        r.embedding = t("EMBEDDING")
    if out["FEATURES"].size:
        r.features = t("FEATURES")
    source = job.batch if job.batch is not None else job.tokens
    if source is None:  # pool
        return r
    coords, kinds = source.coords.to(torch.int32), tuple(source.kinds)
    if job.op in ("tokenize", "reconstruct"):
        if out["INDICES_OUT"].size:
            r.tokens = Tokens(coords, kinds, indices=t("INDICES_OUT"))
        else:
            r.tokens = Tokens(coords, kinds, latents=t("LATENTS"), logvar=t("LOGVAR"))
    if out["TUBELETS"].size:
        r.tubelets = t("TUBELETS")
    if out["GAUSSIANS"].size:
        flat = t("GAUSSIANS")
        parts = flat.split([3, 3, 3, 1, 4], dim=1)
        r.gaussians = {"xyz_raw": parts[0], "features_dc": parts[1].reshape(-1, 1, 3), "scaling_raw": parts[2],
                       "opacity_raw": parts[3], "rotation_raw": parts[4],
                       **{k: meta[k] for k in ("scaling_bias", "opacity_bias", "filter_3d")}}
    return r
