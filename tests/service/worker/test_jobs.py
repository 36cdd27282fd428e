"""The hand-off to the model worker: uint8 pixel patches that become exactly the float input
the official preprocessing gives, and by-value pickles that round-trip every tensor."""

import warnings

import numpy as np
import pytest
import torch

from model.api import Tokens
from model.patchify import frames_to_sparse, voxels_to_sparse
from service.media.image import to_model_range
from service.worker import transport
from service.worker.jobs import Job, model_feats, packed_input, pixel_patches, voxel_patches


@pytest.mark.parametrize("frames, height, width", [(1, 48, 32), (4, 48, 32), (8, 48, 32), (1, 16, 16), (4, 16, 16)])
def test_pixel_patches_equal_the_float_path(frames, height, width):
    pixels = np.random.default_rng(frames).integers(0, 256, (frames, height, width, 3), dtype=np.uint8)
    pixels.setflags(write=False)  # decoders hand out read-only arrays
    reference, _ = frames_to_sparse([torch.from_numpy(to_model_range(pixels[0] if frames == 1 else pixels))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # torch warns on a tensor over read-only memory
        compact = pixel_patches(pixels)
    assert compact.feats.dtype == torch.uint8
    # A byte per value; an image also travels without the three zero frames the model pads it with.
    assert compact.feats.shape == (reference.feats.shape[0], 768 if frames == 1 else 3072)
    ours = model_feats(compact)
    assert torch.equal(ours.feats, reference.feats)
    assert torch.equal(ours.coords, reference.coords) and ours.kinds == reference.kinds


def test_voxels_of_whole_255ths_travel_as_uint8_and_become_the_official_input():
    rng = np.random.default_rng(0)
    coords = rng.permutation(64**3)[:500]
    coords = np.stack(np.unravel_index(coords, (64,) * 3), 1).astype(np.int64)
    levels = rng.integers(0, 256, (500, 768), dtype=np.uint8)
    feats = levels.astype(np.float32) / 255.0  # as packing renders makes them, and check_volume uint8 ones
    reference = voxels_to_sparse([(torch.from_numpy(coords), torch.from_numpy(feats))])
    compact = voxel_patches(coords, feats)
    assert compact.feats.dtype == torch.uint8 and compact.feats.shape == (500, 768)
    assert torch.equal(compact.feats, torch.from_numpy(levels))
    assert torch.equal(compact.coords, reference.coords) and compact.kinds == reference.kinds == ("3D",)
    assert torch.equal(model_feats(compact).feats, reference.feats)  # bit for bit, zeros included
    assert torch.equal(packed_input([compact]).feats, reference.feats[:, :768])
    # Any other float in [0, 1] goes as the official packing makes it.
    feats[3, 5] = 0.5
    other = voxel_patches(coords, feats)
    assert other.feats.dtype == torch.float32 and torch.equal(other.feats, voxels_to_sparse(
        [(torch.from_numpy(coords), torch.from_numpy(feats))]).feats)


def test_float_batches_pass_through():
    batch, _ = frames_to_sparse([torch.zeros(32, 32, 3)])
    assert model_feats(batch) is batch


def test_transport_round_trips_jobs_by_value():
    batch = pixel_patches(np.zeros((1, 32, 32, 3), np.uint8))
    tokens = Tokens(torch.zeros(4, 5, dtype=torch.int32), ("image",), latents=torch.randn(4, 48).to(torch.bfloat16))
    jobs = [Job(1, "embed", batch=batch), Job(2, "decode", tokens=tokens)]
    back = transport.loads(transport.dumps(jobs))
    assert torch.equal(back[0].batch.feats, batch.feats) and back[0].batch.kinds == ("image",)
    assert back[1].tokens.latents.dtype == torch.bfloat16
    assert torch.equal(back[1].tokens.latents, tokens.latents)


def test_packed_images_stay_one_frame_wide_and_mixed_batches_go_whole():
    rng = np.random.default_rng(3)
    images = [pixel_patches(rng.integers(0, 256, (1, 32, 16 * k, 3), dtype=np.uint8)) for k in (1, 2)]
    video = pixel_patches(rng.integers(0, 256, (4, 32, 32, 3), dtype=np.uint8))
    whole = [model_feats(b) for b in images + [video]]
    packed = packed_input(images)
    assert packed.feats.shape == (6, 768) and packed.kinds == ("image", "image")
    assert torch.equal(packed.feats, torch.cat([w.feats[:, :768] for w in whole[:2]]))
    assert torch.equal(packed.coords[:, 0], torch.tensor([0, 0, 1, 1, 1, 1], dtype=packed.coords.dtype))
    mixed = packed_input(images + [video])
    assert mixed.feats.shape == (10, 3072)
    assert torch.equal(mixed.feats, torch.cat([w.feats for w in whole]))


def test_work_counts_attention_by_the_models_widths_and_decoder_passes_as_measured():
    from dataclasses import asdict

    from model.config import get_variant
    from service.worker.jobs import WorkPrice, attention_crossover, linear_flops

    assert attention_crossover(asdict(get_variant("so400m-c").encoder)) == 2 * 1152 + 4304
    assert attention_crossover(asdict(get_variant("tiny").encoder)) == 2 * 256 + 1024
    assert linear_flops(asdict(get_variant("tiny").decoder)) == 2 * (4 * 256**2 + 2 * 256 * 1024) * 4
    batch = pixel_patches(np.zeros((1, 64, 64, 3), np.uint8))  # 16 tokens
    tokenize, reconstruct = Job(0, "tokenize", batch=batch), Job(0, "reconstruct", batch=batch)
    price = WorkPrice(crossover=16, decoder=1.5)
    assert price(tokenize) == 16 * 2
    assert price(reconstruct) == 16 * 2.5 * 2  # an encoder pass and a decoder pass of 1.5
    info = {"encoder": asdict(get_variant("tiny").encoder), "work": {"per_s": 1e4, "decoder_pass": 1.5}}
    assert WorkPrice.of(info) == WorkPrice(1536, 1.5)
    assert WorkPrice.of({})(reconstruct) == reconstruct.cost  # no model described: token passes only
