import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from model import AToken, ATokenizer, CheckpointError, ConfigError, InvalidInputError, TokenLimitError, UnsupportedError
from model.config import GaussianDecoderConfig, get_variant, load_official_yaml, to_arch_cfg, from_arch_cfg
from model.patchify import frames_to_sparse, voxels_to_sparse
from tests.conftest import PARITY_DIR, parity_cases

needs_cases = pytest.mark.skipif(not parity_cases(), reason=f"no parity cases in {PARITY_DIR}")
GS_TINY = GaussianDecoderConfig(model_channels=48, num_blocks=1, num_heads=1, mlp_channels=96)


@pytest.fixture(scope="module")
def tiny():
    return ATokenizer.from_variant("tiny", seed=0)


@pytest.fixture(scope="module")
def tiny_d():
    return ATokenizer.from_variant("tiny-d", seed=0, gs=GS_TINY)


def _images():
    return frames_to_sparse([torch.rand(32, 48, 3) * 2 - 1, torch.rand(8, 32, 32, 3) * 2 - 1])[0]


def test_encode_decode_shapes(tiny):
    batch = _images()
    tokens = tiny.encode(batch)
    assert tokens.latents.shape == (batch.num_tokens, 48) and tokens.mode == "continuous"
    rec = tiny.decode(tokens)
    assert rec.feats.shape == (batch.num_tokens, 3072)
    assert torch.equal(rec.coords, batch.coords)
    emb, dense = tiny.embed(batch, dense=True)
    assert emb.shape == (2, 256) and dense.shape == (batch.num_tokens, 256)
    torch.testing.assert_close(emb.norm(dim=-1), torch.ones(2))


def test_encoding_is_deterministic_and_sampling_is_seeded(tiny):
    batch = _images()
    a, b = tiny.encode(batch), tiny.encode(batch)
    assert torch.equal(a.latents, b.latents)
    s1 = tiny.encode(batch, sample=True, generator=torch.Generator().manual_seed(1))
    s2 = tiny.encode(batch, sample=True, generator=torch.Generator().manual_seed(1))
    assert torch.equal(s1.latents, s2.latents) and not torch.equal(s1.latents, a.latents)


def test_discrete_tokens_round_trip(tiny_d):
    batch = _images()
    tokens = tiny_d.encode(batch, "discrete")
    assert tokens.indices.shape == (batch.num_tokens, 8) and tokens.latents is None
    rec = tiny_d.reconstruct(batch, "discrete")
    torch.testing.assert_close(rec.tubelets.feats, tiny_d.decode(tokens).feats)
    assert rec.frames[0].shape == (1, 3, 32, 48) and rec.frames[1].shape == (8, 3, 32, 32)


def test_3d_reconstruction_gives_gaussians(tiny_d):
    batch = voxels_to_sparse([(torch.tensor([[1, 2, 3], [4, 5, 6]]), torch.rand(2, 768))])
    rec = tiny_d.reconstruct(batch)
    g = rec.gaussians[0]
    assert len(g) == 2 * 32 and rec.frames == [None]
    assert g.xyz.abs().max() <= 0.5 + 0.75 / 64 and (g.opacity > 0).all() and (g.opacity < 1).all()
    torch.testing.assert_close(g.rotation.norm(dim=-1), torch.ones(64))


def test_discrete_on_continuous_model_is_unsupported(tiny):
    with pytest.raises(UnsupportedError, match="quantizer"):
        tiny.encode(_images(), "discrete")


def test_token_limit():
    small = ATokenizer(AToken(dataclasses.replace(get_variant("tiny"), max_tokens=4)))
    with pytest.raises(TokenLimitError) as err:
        small.encode(_images())
    assert err.value.limit == 4 and err.value.actual == 14


def test_bad_latents(tiny):
    tokens = tiny.encode(_images())
    tokens.latents = tokens.latents[:, :10]
    with pytest.raises(InvalidInputError, match="48"):
        tiny.decode(tokens)


def test_save_and_load_round_trip(tiny, tmp_path):
    path = tmp_path / "tiny.safetensors"
    tiny.save(path, model_card={"steps": 0}, trained=False)
    again = ATokenizer.load(path)
    assert again.info.trained is False and again.info.card == {"steps": 0} and len(again.info.sha256) == 64
    batch = _images()
    assert torch.equal(again.encode(batch).latents, tiny.encode(batch).latents)


def test_bfloat16_stays_close_to_float32(tmp_path):
    fp32 = ATokenizer.from_variant("tiny", seed=3)
    path = tmp_path / "m.safetensors"
    fp32.save(path)
    bf16 = ATokenizer.load(path, dtype="bfloat16")
    batch = _images()
    a, b = fp32.embed(batch)[0], bf16.embed(batch)[0]
    assert torch.nn.functional.cosine_similarity(a, b).min() > 0.99
    ra, rb = fp32.decode(fp32.encode(batch)).feats, bf16.decode(bf16.encode(batch)).feats
    assert ((ra - rb).norm() / ra.norm()) < 0.05


@needs_cases
def test_official_pt_checkpoint_loads_with_yaml(tmp_path):
    case = PARITY_DIR / "sod_fsq_small"
    torch.save({"state_dict": {f"module.{k}": v for k, v in load_file(str(case / "model.safetensors")).items()}},
               tmp_path / "atoken-sod.pt")
    tok = ATokenizer.load(tmp_path / "atoken-sod.pt", config=case / "config.yaml")
    assert tok.supports_discrete and tok.config.quantizer.codebook_size == 4096


@needs_cases
def test_gs_checkpoint_with_lpips_keys_loads(tmp_path):
    case = PARITY_DIR / "gs_small"
    state = load_file(str(case / "model.safetensors"))
    state["lpips_loss.net.lin0.weight"] = torch.zeros(1)
    torch.save(state, tmp_path / "3d_decode_gs.pt")
    soc = PARITY_DIR / "soc_small"
    tok = ATokenizer.load(soc / "model.safetensors", config=soc / "config.yaml",
                          gs_checkpoint=tmp_path / "3d_decode_gs.pt", gs_config=case / "config.yaml")
    assert tok.gs_decoder.cfg.model_channels == 96


@needs_cases
def test_mismatched_checkpoint_names_every_problem(tmp_path):
    case = PARITY_DIR / "soc_small"
    state = load_file(str(case / "model.safetensors"))
    state.pop("proj.weight")
    state["encoder.extra.weight"] = torch.zeros(2)
    state["decoder.out_layer.weight"] = torch.zeros(3, 3)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        ATokenizer.load(tmp_path / "bad.pt", config=case / "config.yaml")
    text = str(err.value)
    assert "missing key proj.weight" in text and "unexpected key encoder.extra.weight" in text
    assert "wrong shape decoder.out_layer.weight" in text
    with pytest.raises(CheckpointError, match="does not match"):
        ATokenizer.load(case / "model.safetensors", config="tiny")


def test_unreadable_checkpoint(tmp_path):
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="cannot read"):
        ATokenizer.load(tmp_path / "junk.pt", config="tiny")
    with pytest.raises(CheckpointError, match="does not exist"):
        ATokenizer.load(tmp_path / "missing.safetensors", config="tiny")


def test_config_round_trips_and_rejects_unknowns(tmp_path):
    for name in ("so400m-c", "so400m-d", "so400m-c-s1", "base", "tiny"):
        assert from_arch_cfg(to_arch_cfg(get_variant(name))) == get_variant(name)
    assert get_variant("so400m-c").encoder.head_dim == 72
    with pytest.raises(ConfigError, match="unknown variant"):
        get_variant("huge")
    (tmp_path / "bad.yaml").write_text("model: {foo: 1}\n")
    with pytest.raises(ConfigError):
        load_official_yaml(tmp_path / "bad.yaml")


def test_a_long_video_tile_by_tile_equals_the_whole_clip(tiny):
    """The official encoder runs 16-frame tiles independently, and the pooling's softmax state
    merges exactly: tiles sent as separate items give the whole clip's tokens and embedding."""
    from model.layers.attention import merge_pool_states

    clip = torch.rand(40, 32, 48, 3) * 2 - 1  # 10 latent frames: tiles of 4, 4 and 2
    whole, _ = frames_to_sparse([clip])
    tiles = [frames_to_sparse([clip[i : i + 16]])[0] for i in range(0, 40, 16)]
    model = tiny.model
    with torch.inference_mode():
        ref = model.encode(whole)
        parts = [model.encode(t) for t in tiles]
        pooled, embedding = model.pool(merge_pool_states([p.pool_state for p in parts]))
        recon = model.decode(whole.with_feats(ref.mean))
        recon_tiles = torch.cat([model.decode(t.with_feats(p.mean)) for t, p in zip(tiles, parts)])
    torch.testing.assert_close(torch.cat([p.mean for p in parts]), ref.mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pooled, ref.pooled, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(embedding, ref.embedding, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(recon_tiles, recon, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [
    lambda: frames_to_sparse([torch.rand(32, 48, 3) * 2 - 1, torch.rand(16, 16, 3) * 2 - 1])[0],
    lambda: voxels_to_sparse([(torch.randint(0, 64, (20, 3)), torch.rand(20, 768))]),
])
def test_inputs_may_leave_out_the_zero_frames(tiny, make):
    """Images and voxels fill a tubelet's first 768 values and zeros after: given the 768
    alone, the encoder computes the same tokens and embeddings."""
    full = make()
    assert not full.feats[:, 768:].any()
    short = full.with_feats(full.feats[:, :768].contiguous())
    with torch.inference_mode():
        a, b = tiny.model.encode(full), tiny.model.encode(short)
    torch.testing.assert_close(b.posterior, a.posterior, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(b.embedding, a.embedding, rtol=1e-5, atol=1e-5)
    with pytest.raises(InvalidInputError, match="3072 or 768 channels"):
        tiny.model.encode(full.with_feats(full.feats[:, :500]))


def test_decoding_only_the_first_frame_gives_the_first_frame(tiny):
    tokens = tiny.encode(_images())
    latents = tiny.latent_batch(tokens)
    with torch.inference_mode():
        whole = tiny.model.decode(latents)
        first = tiny.model.decode(latents, columns=768)
    assert first.shape == (whole.shape[0], 768)
    torch.testing.assert_close(first, whole[:, :768], rtol=1e-5, atol=1e-5)
