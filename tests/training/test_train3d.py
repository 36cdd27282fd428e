"""Stage 3 of the curriculum: the Gaussian decoder learns through the differentiable rasteriser."""

import numpy as np
import pytest
import torch

from model.api import ATokenizer
from training.lpips import weights_path
from training.train3d import Train3DConfig, Trainer3D, random_rotation

pytestmark = pytest.mark.skipif(not weights_path("alexnet").is_file(), reason="LPIPS weights not converted")


def test_rotations_are_proper():
    r = random_rotation(np.random.default_rng(0))
    np.testing.assert_allclose(r @ r.T, np.eye(3), atol=1e-12)
    assert np.linalg.det(r) == pytest.approx(1.0)


def test_a_step_moves_the_decoder_and_the_run_saves_and_resumes(tmp_path):
    tok = ATokenizer.from_variant("tiny", seed=0)
    cfg = Train3DConfig(steps=2, rotations=1, size=32, save_every=100, warmup=1)
    trainer = Trainer3D(cfg, tok, tmp_path, meshes=("airplane.ply",))
    asset = trainer.assets[0]
    assert asset.coords.shape[1] == 4 and asset.feats.shape == (len(asset.coords), 768)
    before = [p.detach().clone() for p in trainer.decoder.parameters()]
    losses = trainer.train_step()
    assert np.isfinite(losses["loss"]) and 0 < losses["l1"] < 1
    moved = [not torch.equal(a, b) for a, b in zip(before, trainer.decoder.parameters())]
    assert all(moved)  # every parameter gets a gradient through the renders
    trainer.step = 1
    trainer.save()
    again = Trainer3D(cfg, tok, tmp_path, meshes=("airplane.ply",))
    again.resume()
    assert again.step == 1
    for a, b in zip(again.decoder.state_dict().values(), trainer.decoder.state_dict().values()):
        assert torch.equal(a, b)
    tok.save(tmp_path / "tok.safetensors")  # the exported decoder loads beside a tokenizer
    loaded = ATokenizer.load(tmp_path / "tok.safetensors", gs_checkpoint=tmp_path / "gs.safetensors")
    assert loaded.gs_decoder.cfg.num_gaussians == 8
