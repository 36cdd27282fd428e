"""Compare this implementation with golden outputs of the official AToken code.

    python -m model.parity CASE_DIR [CASE_DIR ...]

A case directory holds `config.yaml` (official layout), `model.safetensors` (official keys),
`manifest.json` and one safetensors file per sample (see shared/parity/README.md). Weights
go through the same loader as official checkpoints. Prints one row per tensor and, last,
`parity: <passed|failed> max_rel_err=<x> tensors=<n>`; exits 0 only when all pass.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from torch import Tensor

from .autoencoder import AToken
from .checkpoint import load_into, read_state_dict
from .config import ATokenConfig, GaussianDecoderConfig, load_official_yaml
from .gs_decoder import GaussianDecoder
from .layout import TokenLayout
from .patchify import frames_to_sparse, sparse_to_frames, voxels_to_sparse
from .sparse import SparseBatch

REL_TOL = 1e-4


@dataclass
class Row:
    name: str
    shape: tuple[int, ...]
    max_abs: float
    rel: float
    exact: bool

    @property
    def passed(self) -> bool:
        return self.max_abs == 0 if self.exact else self.rel <= REL_TOL


def compare(name: str, ours: Tensor, golden: Tensor) -> Row:
    ours = ours.detach().cpu()
    if tuple(ours.shape) != tuple(golden.shape):
        return Row(f"{name} (shape {tuple(ours.shape)} != {tuple(golden.shape)})", tuple(golden.shape),
                   float("inf"), float("inf"), False)
    exact = not golden.is_floating_point()
    diff = (ours.double() - golden.double()).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(golden.double().abs().max()) if golden.numel() else 0.0
    rel = max_abs / scale if scale > 0 else max_abs
    return Row(name, tuple(golden.shape), max_abs, rel, exact)


def _item_kinds(path: Path, manifest_entry: dict | None) -> tuple[str, ...]:
    if manifest_entry and "task_types" in manifest_entry:
        return tuple(manifest_entry["task_types"])
    with safe_open(str(path), framework="pt") as f:
        info = json.loads((f.metadata() or {}).get("info", "{}"))
    return tuple(info.get("task_types", ()))


def _inputs(g: dict[str, Tensor], kinds: tuple[str, ...]) -> SparseBatch | None:
    if "input.feats_raw" in g:
        return voxels_to_sparse([(g["input.coords_raw"], g["input.feats_raw"])])
    pixels = [g[f"input.pixels.{i}"] for i in range(len(kinds)) if f"input.pixels.{i}" in g]
    if len(pixels) != len(kinds):
        return None
    return frames_to_sparse(pixels)[0]


def run_tokenizer_sample(model: AToken, g: dict[str, Tensor], kinds: tuple[str, ...], prefix: str) -> list[Row]:
    rows: list[Row] = []

    def check(name: str, ours: Tensor) -> None:
        if name in g:
            rows.append(compare(f"{prefix}{name}", ours, g[name]))

    batch = _inputs(g, kinds)
    if batch is not None:
        check("sparse.feats", batch.feats)
        check("sparse.coords", batch.coords.to(torch.int32))
        for i, frames in enumerate(sparse_to_frames(batch)):
            if frames is not None:
                check(f"out.input_frames.{i}", frames)
    golden_in = SparseBatch(g["sparse.feats"], g["sparse.coords"], kinds)
    layout = TokenLayout.build(golden_in.coords, golden_in.batch_size)
    with torch.no_grad():
        enc = model.encode(golden_in, layout)
        check("enc.x_no_proj", enc.features)
        check("enc.posterior", enc.posterior)
        check("enc.mean", enc.mean)
        check("enc.logvar", enc.logvar)
        check("enc.pooled_raw", enc.pooled)
        check("enc.image_feat", enc.embedding)
        if "fsq.input" in g:
            codes, indices, bounded = model.quantize(g["fsq.input"])
            check("fsq.bounded", bounded)
            check("fsq.indices", indices.to(torch.int32))
            check("fsq.codes", codes)
            rows.append(compare(f"{prefix}fsq.indices_to_codes", model.quantizer.indices_to_codes(g["fsq.indices"]),
                                g["fsq.codes"]))
        if "dec.latent" in g:
            rec = model.decode(golden_in.with_feats(g["dec.latent"]), layout)
            check("dec.rec_feats", rec)
            for i, frames in enumerate(sparse_to_frames(golden_in.with_feats(g["dec.rec_feats"]))):
                if frames is not None:
                    check(f"out.rec_frames.{i}", frames)
        if "gs_in.coords" in g:
            check("gs_in.coords", golden_in.coords[:, [0, 2, 3, 4]].to(torch.int32))
        if batch is not None and "dec.rec_feats" in g:
            out = model(batch, discrete=model.quantizer is not None)
            rows.append(compare(f"{prefix}end_to_end.rec_feats", out["reconstruction"], g["dec.rec_feats"]))
    return rows


def run_gs_sample(model: GaussianDecoder, g: dict[str, Tensor], prefix: str) -> list[Row]:
    rows = []
    with torch.no_grad():
        for semantics in ("flash_attn", "xformers"):
            if f"{semantics}.out_layer" not in g:
                continue
            raw = model(g["input.feats"], g["input.coords"], semantics=semantics)
            rows.append(compare(f"{prefix}{semantics}.out_layer", raw, g[f"{semantics}.out_layer"]))
            for b, gauss in enumerate(model.to_gaussians(raw, g["input.coords"].long())):
                fields = {
                    "xyz_raw": gauss.xyz_raw, "xyz": gauss.xyz, "features_dc": gauss.features_dc,
                    "scaling_raw": gauss.scaling_raw, "scaling": gauss.scaling, "opacity_raw": gauss.opacity_raw,
                    "opacity": gauss.opacity, "rotation_raw": gauss.rotation_raw, "rotation": gauss.rotation,
                }
                for name, value in fields.items():
                    key = f"{semantics}.obj{b}.{name}"
                    if key in g:
                        rows.append(compare(f"{prefix}{key}", value, g[key]))
    return rows


def load_case_model(case: Path) -> tuple[AToken | GaussianDecoder, dict]:
    manifest = json.loads((case / "manifest.json").read_text())
    cfg = load_official_yaml(case / manifest.get("config_file", "config.yaml"))
    model: AToken | GaussianDecoder
    if isinstance(cfg, ATokenConfig):
        model = AToken(cfg)
    elif isinstance(cfg, GaussianDecoderConfig):
        model = GaussianDecoder(cfg)
    else:  # pragma: no cover
        raise TypeError(cfg)
    weights = case / manifest.get("weights_file", "model.safetensors")
    load_into(model, read_state_dict(weights), source=str(weights))
    return model.eval(), manifest


def run_case(case: str | Path) -> list[Row]:
    case = Path(case)
    model, manifest = load_case_model(case)
    rows: list[Row] = []
    for sample in manifest.get("samples", []):
        path = case / sample["file"]
        g = load_file(str(path))
        prefix = f"{case.name}/{sample.get('name', path.stem)}/"
        if isinstance(model, GaussianDecoder):
            rows += run_gs_sample(model, g, prefix)
        else:
            rows += run_tokenizer_sample(model, g, _item_kinds(path, sample), prefix)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.parity", description=__doc__.split("\n\n")[0])
    parser.add_argument("cases", nargs="+", type=Path, help="case directories (config.yaml, model.safetensors, ...)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows: list[Row] = []
    for case in args.cases:
        rows += run_case(case)
    width = max((len(r.name) for r in rows), default=10)
    print(f"{'tensor':<{width}}  {'shape':<18} {'max_abs_err':>12} {'rel_err':>10}  result")
    for r in rows:
        print(f"{r.name:<{width}}  {str(list(r.shape)):<18} {r.max_abs:>12.3e} {r.rel:>10.3e}  "
              f"{'ok' if r.passed else 'FAIL'}")
    ok = bool(rows) and all(r.passed for r in rows)
    worst = max((r.rel for r in rows if not r.exact), default=0.0)
    print(f"parity: {'passed' if ok else 'failed'} max_rel_err={worst:.3e} tensors={len(rows)}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
