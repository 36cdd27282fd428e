"""The wire format between the front end and the Triton model.

One request carries a group of jobs: the front end's batch, split only where its jobs' inputs
have different widths (image pixels, video pixels, float features, indices). Every tensor has
batch dimension 1 and the group's rows stacked below it (`allow_ragged_batch`), so Triton's
dynamic batcher can still join requests from many front ends, and each request costs one HTTP
round trip and one pass through the Python backend's stub however many jobs it holds. Which
rows are whose travels in the JSON tensors: META (jobs in) and ERROR (results out).
"""

from __future__ import annotations

import json
from collections import defaultdict
from itertools import accumulate

import numpy as np
import torch

from model.api import Tokens
from model.layers.attention import PoolState
from model.sparse import SparseBatch

from .worker.engine import GAUSSIAN_FIELDS
from .worker.jobs import Job, JobResult, model_feats

INPUTS = ("META", "FEATS", "PIXELS", "COORDS", "INDICES")
OUTPUTS = ("EMBEDDING", "FEATURES", "LATENTS", "LOGVAR", "INDICES_OUT", "TUBELETS", "PIXELS_OUT", "GAUSSIANS",
           "ERROR")
ARRAY_OUTPUTS = OUTPUTS[:-1]
OUTPUT_DTYPES = {"INDICES_OUT": np.int64, "PIXELS_OUT": np.uint8}  # the rest are float32


def pack_json(obj) -> np.ndarray:
    """JSON as a [1, n] uint8 array (plain numbers travel more reliably than BYTES tensors)."""
    return np.frombuffer(json.dumps(obj).encode(), dtype=np.uint8)[None].copy()


def unpack_json(arr: np.ndarray):
    raw = np.ascontiguousarray(arr).astype(np.uint8).tobytes()
    try:
        return json.loads(raw.decode())
    except ValueError:
        raise ValueError(f"bad JSON payload: shape {arr.shape} dtype {arr.dtype} head {raw[:40]!r}") from None


def _stack(parts: list[np.ndarray], dtype, width: int = 0) -> np.ndarray:
    """Row blocks of one width -> [1, rows, width]; no rows at all -> [1, 0, width]."""
    parts = [p for p in parts if p.shape[0]]
    if not parts:
        return np.zeros((1, 0, width), dtype)
    if len(parts) == 1:  # a lone job's rows travel as they are (the request is written out once anyway)
        return np.ascontiguousarray(parts[0], dtype)[None]
    return np.concatenate(parts).astype(dtype, copy=False)[None]


def _unstack(arr: np.ndarray, rows: list[int]) -> list[np.ndarray]:
    """[1, sum(rows), ...] -> a view per row count. Slices: np.split took 10 us a call, on
    every request's every input and output at both ends."""
    ends = list(accumulate(rows))
    return [arr[0, end - n:end] for n, end in zip(rows, ends)]


# ------------------------------------------------------------------------------- jobs in
def _job_arrays(job: Job) -> tuple[dict, dict[str, np.ndarray]]:
    """One job's description and its input rows (FEATS, PIXELS, COORDS, INDICES)."""
    meta = {"op": job.op, "mode": job.mode, "dense": job.dense, "gaussians": job.gaussians, "partial": job.partial,
            "pixels": job.pixels, "embedding": job.embedding}
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
    meta.update(kind=kind, rows=int(coords.shape[0]))
    indices = job.tokens.indices.numpy() if job.tokens is not None and job.tokens.indices is not None \
        else np.zeros((coords.shape[0], 0), np.int64)
    if pixels is None:
        pixels = np.zeros((coords.shape[0], 0), np.uint8)
    return meta, {"FEATS": feats, "PIXELS": pixels, "COORDS": coords.numpy(), "INDICES": indices}


def pack_requests(jobs: list[Job]) -> list[tuple[list[int], dict[str, np.ndarray]]]:
    """As few requests as hold `jobs`: (positions of its jobs, named arrays) each. Jobs share a
    request when their input rows, and the pixels or floats they get back, have the same widths
    (a job without rows joins the first): an image's and a video's tokens to decode are alike, their
    pixels are not."""
    described = [_job_arrays(job) for job in jobs]
    groups: dict[tuple, list[int]] = {}
    for i, (job, (meta, arrays)) in enumerate(zip(jobs, described)):
        # Decoded floats come back whole (3072) but for 3D items (768): those two cannot stack.
        key = ((*(a.shape[1] for a in arrays.values()), job.pixels_width, job.tubelet_kind == "3D") if meta["rows"]
               else next(iter(groups), ()))
        groups.setdefault(key, []).append(i)
    requests = []
    for positions in groups.values():
        parts = {name: [described[i][1][name] for i in positions] for name in INPUTS[1:]}
        requests.append((positions, {
            "META": pack_json({"jobs": [described[i][0] for i in positions]}),
            "FEATS": _stack(parts["FEATS"], np.float32), "PIXELS": _stack(parts["PIXELS"], np.uint8),
            "COORDS": _stack(parts["COORDS"], np.int32, width=5), "INDICES": _stack(parts["INDICES"], np.int64)}))
    return requests


def info_inputs() -> dict[str, np.ndarray]:
    """A request with no jobs: the model answers which model it is."""
    return {"META": pack_json({"info": True, "jobs": []}), "FEATS": np.zeros((1, 0, 0), np.float32),
            "PIXELS": np.zeros((1, 0, 0), np.uint8), "COORDS": np.zeros((1, 0, 5), np.int32),
            "INDICES": np.zeros((1, 0, 0), np.int64)}


def inputs_to_jobs(first_id: int, metas: list[dict], arrays: dict[str, np.ndarray]) -> list[Job]:
    """One request's jobs (`metas`: its META's "jobs"), numbered from first_id."""
    rows = [m["rows"] for m in metas]
    split = {name: _unstack(arrays[name], rows) for name in INPUTS[1:]}
    return [_job(first_id + k, meta, {name: split[name][k] for name in split}) for k, meta in enumerate(metas)]


def _job(job_id: int, meta: dict, arrays: dict[str, np.ndarray]) -> Job:
    kind = meta["kind"]
    if meta["op"] == "pool":
        return Job(job_id, "pool", meta["mode"], pool_state=_state_from_json(meta["pool_state"]))
    coords = torch.from_numpy(np.ascontiguousarray(arrays["COORDS"])).to(torch.int32)
    pixels, indices = arrays["PIXELS"], arrays["INDICES"]
    feats = torch.from_numpy(np.ascontiguousarray(pixels if pixels.shape[1] else arrays["FEATS"]))
    flags = dict(mode=meta["mode"], dense=meta["dense"], gaussians=meta["gaussians"], pixels=meta["pixels"],
                 embedding=meta.get("embedding", False))
    if meta["op"] == "decode":
        tokens = (Tokens(coords, (kind,), indices=torch.from_numpy(np.ascontiguousarray(indices)))
                  if indices.shape[1] else Tokens(coords, (kind,), latents=feats))
        return Job(job_id, "decode", tokens=tokens, **flags)
    return Job(job_id, meta["op"], batch=SparseBatch(feats, coords, (kind,)), partial=meta["partial"], **flags)


def _state_to_json(state: PoolState) -> dict:
    return {f: getattr(state, f).tolist() for f in ("peak", "total", "weighted")}


def _state_from_json(obj: dict) -> PoolState:
    return PoolState(*(torch.tensor(obj[f], dtype=torch.float32) for f in ("peak", "total", "weighted")))


# ---------------------------------------------------------------------------- results out
def _result_arrays(r: JobResult) -> dict[str, np.ndarray | None]:
    tokens, g = r.tokens, r.gaussians
    pixels = r.tubelets is not None and r.tubelets.dtype == torch.uint8
    return {
        "EMBEDDING": None if r.embedding is None else r.embedding.numpy()[None],
        "FEATURES": None if r.features is None else r.features.numpy(),
        "LATENTS": None if tokens is None or tokens.latents is None else tokens.latents.numpy(),
        "LOGVAR": None if tokens is None or tokens.logvar is None else tokens.logvar.numpy(),
        "INDICES_OUT": None if tokens is None or tokens.indices is None else tokens.indices.numpy(),
        "TUBELETS": None if r.tubelets is None or pixels else r.tubelets.numpy(),
        "PIXELS_OUT": r.tubelets.numpy() if pixels else None,
        "GAUSSIANS": (np.concatenate([g[k].reshape(g[k].shape[0], -1).numpy() for k in GAUSSIAN_FIELDS], 1)
                      if g else None),
    }


def results_to_outputs(results: list[JobResult]) -> dict[str, np.ndarray]:
    """One request's results, in its jobs' order: row blocks per output, and in ERROR each
    job's error, timing, pooling state and how many rows of each output are its own."""
    metas, parts = [], defaultdict(list)
    for r in results:
        arrays = _result_arrays(r)
        meta = {"error": r.error, "compute_ms": r.compute_ms,
                "rows": {name: (-1 if a is None else int(a.shape[0])) for name, a in arrays.items()}}
        if r.pool_state is not None:
            meta["pool_state"] = _state_to_json(r.pool_state)
        if r.gaussians:
            meta.update({k: r.gaussians[k] for k in ("scaling_bias", "opacity_bias", "filter_3d")})
        metas.append(meta)
        for name, a in arrays.items():
            if a is not None:
                parts[name].append(a)
    # Only outputs some job has: each tensor costs the stub, the server and the client work
    # even empty, and a batch of /encode jobs needs one of the eight.
    out = {name: _stack(parts[name], OUTPUT_DTYPES.get(name, np.float32)) for name in ARRAY_OUTPUTS if parts[name]}
    out["ERROR"] = pack_json({"results": metas})
    return out


def info_outputs(info: dict) -> dict[str, np.ndarray]:
    out = results_to_outputs([])
    out["ERROR"] = pack_json({"info": info})
    return out


def outputs_to_results(jobs: list[Job], out: dict[str, np.ndarray]) -> list[JobResult]:
    metas = unpack_json(out["ERROR"])["results"]
    if len(metas) != len(jobs):
        raise ValueError(f"{len(metas)} results for {len(jobs)} jobs")
    split = {name: (_unstack(out[name], [max(0, m["rows"][name]) for m in metas]) if out.get(name) is not None
                    else [None] * len(metas)) for name in ARRAY_OUTPUTS}
    return [_result(job, meta, {name: (split[name][k] if meta["rows"][name] >= 0 else None)
                                for name in ARRAY_OUTPUTS})
            for k, (job, meta) in enumerate(zip(jobs, metas))]


def _result(job: Job, meta: dict, arrays: dict[str, np.ndarray | None]) -> JobResult:
    r = JobResult(job.id, compute_ms=meta.get("compute_ms", 0.0))
    if meta.get("error"):
        r.error = tuple(meta["error"])
        return r
    if meta.get("pool_state"):
        r.pool_state = _state_from_json(meta["pool_state"])
    t = lambda name: torch.from_numpy(np.array(arrays[name]))  # noqa: E731 - a writable copy
    if arrays["EMBEDDING"] is not None:
        r.embedding = t("EMBEDDING")[0]
    if arrays["FEATURES"] is not None:
        r.features = t("FEATURES")
    source = job.batch if job.batch is not None else job.tokens
    if source is None:  # pool
        return r
    coords, kinds = source.coords.to(torch.int32), tuple(source.kinds)
    if job.op in ("tokenize", "reconstruct"):
        if arrays["INDICES_OUT"] is not None:
            r.tokens = Tokens(coords, kinds, indices=t("INDICES_OUT"))
        elif arrays["LATENTS"] is not None:
            r.tokens = Tokens(coords, kinds, latents=t("LATENTS"),
                              logvar=t("LOGVAR") if arrays["LOGVAR"] is not None else None)
    if arrays["TUBELETS"] is not None:
        r.tubelets = t("TUBELETS")
    elif arrays["PIXELS_OUT"] is not None:
        r.tubelets = t("PIXELS_OUT")
    if arrays["GAUSSIANS"] is not None:
        parts = t("GAUSSIANS").split([3, 3, 3, 1, 4], dim=1)
        r.gaussians = {"xyz_raw": parts[0], "features_dc": parts[1].reshape(-1, 1, 3), "scaling_raw": parts[2],
                       "opacity_raw": parts[3], "rotation_raw": parts[4],
                       **{k: meta[k] for k in ("scaling_bias", "opacity_bias", "filter_3d")}}
    return r
