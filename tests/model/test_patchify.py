import pytest
import torch

from model.errors import InvalidInputError
from model.patchify import (frames_to_sparse, patchify_frames, plan_crop, prepare_frames, sparse_to_frames,
                            unpatchify_frames, voxels_to_sparse)
from model.sparse import SparseBatch, cat


def test_patchify_round_trip_video():
    x = torch.rand(8, 48, 64, 3) * 2 - 1
    feats, coords = patchify_frames(x)
    assert feats.shape == (2 * 3 * 4, 3072) and coords.shape == (24, 4)
    torch.testing.assert_close(unpatchify_frames(feats, coords), x.permute(0, 3, 1, 2), rtol=0, atol=0)


def test_unpatchify_uses_coords_not_row_order():
    x = torch.rand(4, 32, 48, 3)
    feats, coords = patchify_frames(x)
    perm = torch.randperm(feats.shape[0])
    torch.testing.assert_close(unpatchify_frames(feats[perm], coords[perm]), x.permute(0, 3, 1, 2))


@pytest.mark.parametrize("frames,expected", [(1, 4), (3, 4), (4, 4), (7, 4), (17, 16), (22, 20)])
def test_official_frame_rules(frames, expected):
    assert plan_crop(frames, 32, 32).frames == expected


def test_centre_crop_and_image_padding():
    img = torch.rand(70, 99, 3)
    frames, crop = prepare_frames(img)
    assert frames.shape == (4, 64, 96, 3)
    assert (crop.top, crop.left) == (3, 1)
    torch.testing.assert_close(frames[0], img[3:67, 1:97])
    assert frames[1:].abs().sum() == 0  # zero padding to a 4-frame tubelet


def test_frames_to_sparse_coords_and_kinds():
    batch, crops = frames_to_sparse([torch.rand(32, 48, 3), torch.rand(20, 16, 16, 3)])
    assert batch.kinds == ("image", "video")
    assert batch.coords.dtype == torch.int32
    assert batch.tokens_per_item() == [6, 5]
    back = sparse_to_frames(batch)
    assert back[0].shape == (1, 3, 32, 48) and back[1].shape == (20, 3, 16, 16)


def test_channels_first_video_is_accepted():
    x = torch.rand(4, 3, 32, 32)
    a, _ = frames_to_sparse([x])
    b, _ = frames_to_sparse([x.permute(0, 2, 3, 1)])
    torch.testing.assert_close(a.feats, b.feats)


def test_voxels_to_sparse_layout():
    xyz = torch.tensor([[1, 2, 3], [60, 0, 5]])
    feats = torch.rand(2, 768)
    batch = voxels_to_sparse([(xyz, feats)])
    assert batch.coords.tolist() == [[0, 1, 1, 2, 3], [0, 1, 60, 0, 5]]
    torch.testing.assert_close(batch.feats[:, :768], feats * 2 - 1)
    assert batch.feats[:, 768:].abs().sum() == 0
    assert sparse_to_frames(batch) == [None]


def test_cat_and_split_are_inverse():
    a, _ = frames_to_sparse([torch.rand(32, 32, 3)])
    b, _ = frames_to_sparse([torch.rand(16, 48, 3), torch.rand(8, 16, 16, 3)])
    packed = cat([a, b])
    assert packed.kinds == ("image", "image", "video")
    parts = packed.split()
    torch.testing.assert_close(parts[0].feats, a.feats)
    torch.testing.assert_close(parts[2].coords, b.item(1).coords)


@pytest.mark.parametrize("bad,match", [
    (torch.rand(8, 8, 3), "smaller than one"),
    (torch.rand(32, 32, 4), "3 colour channels"),
    (torch.randint(0, 255, (32, 32, 3)), "floating point"),
    (torch.rand(2, 2, 32, 32, 3), "shape"),
])
def test_bad_pixels_raise_typed_errors(bad, match):
    with pytest.raises(InvalidInputError, match=match):
        frames_to_sparse([bad])


def test_bad_voxels_raise_typed_errors():
    with pytest.raises(InvalidInputError, match="64"):
        voxels_to_sparse([(torch.tensor([[64, 0, 0]]), torch.rand(1, 768))])
    with pytest.raises(InvalidInputError, match="768"):
        voxels_to_sparse([(torch.tensor([[1, 0, 0]]), torch.rand(1, 700))])


def test_validate_rejects_bad_batches():
    good, _ = frames_to_sparse([torch.rand(32, 32, 3)])
    good.validate(3072)
    with pytest.raises(InvalidInputError, match="non-negative"):
        SparseBatch(good.feats, good.coords - 1, good.kinds).validate()
    with pytest.raises(InvalidInputError, match="out of range"):
        shifted = good.coords.clone()
        shifted[:, 0] = 1
        SparseBatch(good.feats, shifted, good.kinds).validate()
    with pytest.raises(InvalidInputError, match="channels"):
        good.validate(48)
    with pytest.raises(InvalidInputError, match="rows"):
        SparseBatch(good.feats[:2], good.coords, good.kinds).validate()
    with pytest.raises(InvalidInputError, match="NaN"):
        SparseBatch(good.feats * float("nan"), good.coords, good.kinds).validate()
    with pytest.raises(InvalidInputError, match="empty"):
        SparseBatch(good.feats[:0], good.coords[:0], good.kinds).validate()
