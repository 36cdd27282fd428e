import torch

from model.config import FSQConfig
from model.fsq import FSQ


def test_every_code_round_trips():
    fsq = FSQ(FSQConfig())
    idx = torch.arange(4096).repeat(8, 1).T  # [4096, 8]
    codes = fsq.indices_to_codes(idx)
    assert set(codes.unique().tolist()) == {-1.0, -0.5, 0.0, 0.5}
    assert torch.equal(fsq.codes_to_indices(codes.unflatten(-1, (8, 6))), idx)


def test_quantized_codes_and_indices_agree():
    fsq = FSQ(FSQConfig())
    z = torch.randn(100, 48) * 3
    codes, indices, bounded = fsq(z)
    assert indices.shape == (100, 8) and int(indices.max()) < 4096 and bounded.shape == (100, 8, 6)
    torch.testing.assert_close(fsq.indices_to_codes(indices), codes)
    assert fsq.bits_per_token == 96


def test_bound_slope_is_the_derivative_at_zero():
    fsq = FSQ(FSQConfig(levels=(8, 5, 5, 5), num_codebooks=1))
    eps = 1e-4
    finite = (fsq.bound(torch.full((4,), eps)) - fsq.bound(torch.full((4,), -eps))) / (2 * eps)
    assert torch.allclose(fsq.bound_slope(), finite, rtol=1e-3)
