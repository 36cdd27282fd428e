"""Curriculum stage 3: the Gaussian decoder, trained with a rendering loss through our own
differentiable splat rasteriser.

    python -m training.train3d --tokenizer runs/default/model.safetensors --minutes 25 --out runs/gs

The tokenizer stays frozen, so its image and video reconstructions are kept exactly. Each
training mesh is normalised, turned by random rotations, rendered into the 16 standard views
and packed into the 64^3 volume the way the service does it; the tokenizer's round trip of
the voxel features is the decoder's input (as at inference). Each step renders the decoder's
Gaussians from two of the asset's cameras at `--size` pixels and compares them with the mesh
renders: L1 + LPIPS. Deterministic for a seed; `--resume` continues a run.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from model.api import FORMAT, ATokenizer
from model.checkpoint import save_safetensors
from model.config import GS_VARIANTS
from model.gs_decoder import GaussianDecoder
from model.patchify import voxel_features, voxels_to_sparse
from .cli import add_config_flags, config_from, resolve_device
from .lpips import LPIPS

# Meshes that ship inside pyvista (examples/) and pymeshlab (tests/sample_meshes/). The ones
# that fill ~20k voxels (nut.ply, cube.obj, sphere.ply) are left out: on a CPU each step would
# composite ~160k Gaussians per view.
TRAIN_MESHES = ("airplane.ply", "ant.ply", "colored_airplane.ply", "bone.ply", "bunny.obj")
HELD_OUT_MESHES = ("cow.obj",)


@dataclass
class Train3DConfig:
    gs_variant: str = "gs-small"
    steps: int = 2000
    minutes: float = 0.0
    stop_at: int = 0  # stop at this step, the schedule still spanning `steps`
    rotations: int = 3  # random orientations of each training mesh
    views_per_step: int = 2
    size: int = 128
    lr: float = 5e-4
    warmup: int = 50
    lpips_weight: float = 0.2
    seed: int = 0
    save_every: int = 200
    threads: int = 0
    device: str = "auto"  # auto: CUDA when available, else CPU (mesh preparation stays on the CPU)


def mesh_path(name: str) -> Path:
    import importlib.util

    for package, sub in (("pyvista", "examples"), ("pymeshlab", "tests/sample_meshes")):
        spec = importlib.util.find_spec(package)
        if spec and spec.submodule_search_locations:
            path = Path(spec.submodule_search_locations[0]) / sub / name
            if path.is_file():
                return path
    raise FileNotFoundError(f"{name}: not found in pyvista or pymeshlab (they ship the 3D training data)")


def random_rotation(rng: np.random.Generator) -> np.ndarray:
    q = rng.normal(size=4)
    w, x, y, z = q / np.linalg.norm(q)
    return np.array([[1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y)],
                     [2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x)],
                     [2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y)]])


@dataclass
class Asset:
    """One posed object: the decoder's input and the renders it must reproduce."""

    name: str
    coords: torch.Tensor  # [V, 4] int (batch 0, x, y, z)
    feats: torch.Tensor  # [V, 768] the tokenizer's round trip of the voxel features
    images: np.ndarray  # uint8 [16, 256, 256, 3]
    c2w: np.ndarray  # [16, 4, 4] OpenGL camera-to-world
    fov: float


def prepare_asset(tok: ATokenizer, name: str, rotation: np.ndarray | None = None) -> Asset:
    """Mesh -> renders -> volume -> tokenizer round trip (no gradients: the tokenizer is frozen)."""
    from service.media.mesh import ColoredMesh, load_mesh
    from service.media.pack3d import intrinsics_from_fov, pack_views, w2c_from_c2w_opengl
    from service.media.render import render_views

    path = mesh_path(name)
    mesh = load_mesh(path.read_bytes(), path.suffix[1:]).normalized()
    if rotation is not None:
        mesh = ColoredMesh(mesh.vertices @ rotation.T, mesh.faces, mesh.vertex_colors, mesh.face_colors, mesh.uv,
                           mesh.texture).normalized()
    views = render_views(mesh)
    coords, feats = pack_views(views.images, views.depths, np.stack([intrinsics_from_fov(views.fov)] * len(views.c2w)),
                               w2c_from_c2w_opengl(views.c2w))
    batch = voxels_to_sparse([(torch.from_numpy(coords), torch.from_numpy(feats))])
    rec = tok.decode(tok.encode(batch))
    xyz, values = voxel_features(rec, 0)
    return Asset(name, torch.cat([torch.zeros_like(xyz[:, :1]), xyz], 1), values.float(), views.images,
                 views.c2w, views.fov)


def render_asset_views(gaussians, asset: Asset, picks: list[int], size: int) -> torch.Tensor:
    """Differentiable renders [len(picks), 3, size, size] in [0, 1] on a black background."""
    from service.media.pack3d import w2c_from_c2w_opengl
    from service.media.splat import render
    from service.media.splat.preview import pixel_intrinsics

    dev = gaussians.xyz_raw.device
    K = pixel_intrinsics(asset.fov, size).to(dev)
    colors = gaussians.rgb
    out = []
    for w2c in w2c_from_c2w_opengl(asset.c2w[picks]):
        img, _ = render(gaussians.xyz, gaussians.rotation, gaussians.scaling, gaussians.opacity[:, 0], colors,
                        torch.from_numpy(w2c).float().to(dev), K, size, size, torch.zeros(3, device=dev))
        out.append(img.permute(2, 0, 1))
    return torch.stack(out)


def target_views(asset: Asset, picks: list[int], size: int) -> torch.Tensor:
    x = torch.from_numpy(asset.images[picks]).permute(0, 3, 1, 2).float() / 255
    return F.interpolate(x, size=(size, size), mode="area") if x.shape[-1] != size else x


class Trainer3D:
    def __init__(self, cfg: Train3DConfig, tokenizer: Path | ATokenizer, out: Path, meshes=TRAIN_MESHES):
        self.cfg, self.out, self.tokenizer_path = cfg, out, tokenizer
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        tok = tokenizer if isinstance(tokenizer, ATokenizer) else ATokenizer.load(tokenizer)
        # Training needs gradients through compositing: the plain PyTorch rasteriser has them.
        from service.media.splat import set_backend

        set_backend("torch")
        self.device = resolve_device(cfg.device)
        self.decoder = GaussianDecoder(GS_VARIANTS[cfg.gs_variant]).to(self.device)
        self.lpips = LPIPS("alexnet").to(self.device)
        rng = np.random.default_rng(cfg.seed)
        start = time.monotonic()
        self.assets = [prepare_asset(tok, name, random_rotation(rng) if r else None)
                       for name in meshes for r in range(cfg.rotations)]
        print(f"prepared {len(self.assets)} posed training objects in {time.monotonic() - start:.0f} s", flush=True)
        self.opt = torch.optim.AdamW(self.decoder.parameters(), lr=cfg.lr, betas=(0.9, 0.99), weight_decay=0.0)
        self.rng = np.random.default_rng(cfg.seed + 1)
        self.step, self.elapsed, self.history = 0, 0.0, []

    def lr_at(self, step: int) -> float:
        cfg = self.cfg
        if step < cfg.warmup:
            return cfg.lr * (step + 1) / cfg.warmup
        progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
        return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        asset = self.assets[self.rng.integers(len(self.assets))]
        picks = sorted(self.rng.choice(len(asset.c2w), cfg.views_per_step, replace=False).tolist())
        gaussians = self.decoder.decode(asset.feats.to(self.device), asset.coords.to(self.device))[0]
        ours = render_asset_views(gaussians, asset, picks, cfg.size)
        truth = target_views(asset, picks, cfg.size).to(self.device)
        l1 = (ours - truth).abs().mean()
        lp = self.lpips(ours * 2 - 1, truth * 2 - 1).mean()
        loss = l1 + cfg.lpips_weight * lp
        for group in self.opt.param_groups:
            group["lr"] = self.lr_at(self.step)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.decoder.parameters(), 1.0)
        self.opt.step()
        mse = (ours.detach().clamp(0, 1) - truth).pow(2).mean().item()
        return {"loss": loss.item(), "l1": l1.item(), "lpips": lp.item(), "psnr": 10 * math.log10(1 / max(mse, 1e-12))}

    def card(self) -> dict:
        return {"stage": "3D (curriculum stage 3): Gaussian decoder with a rendering loss, tokenizer frozen",
                "data": {"train": list(TRAIN_MESHES), "held_out": list(HELD_OUT_MESHES),
                         "augmentation": f"{self.cfg.rotations} orientations per mesh (the first unrotated)",
                         "views": "16 standard cameras, 256 px renders (service.media.render)"},
                "objective": f"L1 + {self.cfg.lpips_weight} LPIPS(alexnet) on {self.cfg.views_per_step} "
                             f"random views per step at {self.cfg.size} px",
                "tokenizer": str(getattr(self.tokenizer_path, "info", self.tokenizer_path)), "train_config": asdict(self.cfg), "steps": self.step,
                "seconds": round(self.elapsed, 1), "last_losses": self.history[-1] if self.history else {}}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        self.export(self.out / "gs.safetensors")
        torch.save({"decoder": self.decoder.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                    "elapsed": self.elapsed, "rng": json.dumps(self.rng.bit_generator.state),
                    "history": json.dumps(self.history)}, self.out / "state_gs.pt")

    def export(self, path: Path, dtype: torch.dtype | None = None) -> None:
        """The decoder in the checkpoint format `ATokenizer.load(gs_checkpoint=...)` reads."""
        meta = {"format": FORMAT, "gs_config": self.decoder.cfg.to_dict(), "model_card": self.card()}
        save_safetensors(self.decoder, path, meta, dtype)

    def resume(self) -> None:
        state = torch.load(self.out / "state_gs.pt", weights_only=True)
        self.decoder.load_state_dict(state["decoder"])
        self.opt.load_state_dict(state["optimizer"])
        self.step, self.elapsed = int(state["step"]), float(state["elapsed"])
        self.rng.bit_generator.state = json.loads(state["rng"])
        self.history = json.loads(state["history"])

    def run(self) -> None:
        cfg = self.cfg
        start = time.monotonic() - self.elapsed
        running: dict[str, float] = {}
        while self.step < cfg.steps:
            losses = self.train_step()
            self.step += 1
            running = {k: 0.9 * running.get(k, v) + 0.1 * v for k, v in losses.items()}
            self.elapsed = time.monotonic() - start
            if self.step % 10 == 0 or self.step == 1:
                rate = self.step / max(self.elapsed, 1e-6)
                print(f"step {self.step}/{cfg.steps} {rate:.2f} it/s | "
                      + " ".join(f"{k} {v:.4g}" for k, v in running.items()), flush=True)
                self.history.append({"step": self.step, **{k: round(v, 5) for k, v in running.items()}})
            if self.step % cfg.save_every == 0:
                self.save()
            if cfg.stop_at and self.step >= cfg.stop_at:
                break
            if cfg.minutes and self.elapsed > cfg.minutes * 60:
                print(f"time limit of {cfg.minutes} min reached at step {self.step}")
                break
        self.save()
        print(f"saved {self.out / 'gs.safetensors'} after {self.step} steps, {self.elapsed / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flags(parser, Train3DConfig())
    parser.add_argument("--tokenizer", type=Path, required=True, help="the frozen tokenizer checkpoint")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ship", type=Path, help="afterwards, store the decoder here (float16)")
    args = parser.parse_args(argv)
    trainer = Trainer3D(config_from(args, Train3DConfig), args.tokenizer, args.out)
    if args.resume:
        trainer.resume()
    trainer.run()
    if args.ship:
        trainer.export(args.ship, torch.float16)
        print(f"shipped {args.ship} ({args.ship.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
