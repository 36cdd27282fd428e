import math

import pytest
import torch
import torch.nn.functional as F

from model.errors import ConfigError
from model.layers import Mlp, mlp
from model.layers import attention as attn
from model.layers.attention import Segments, segment_softmax_pool, varlen_attention
from model.layers.pos_embed import LearnedPosTable
from model.layers.rope import apply_rope, rope_angles


def _qkv(n, h=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, h, d, generator=g) * 2 for _ in range(3)]


def _with_backend(name, q, k, v, seg, scale, softcap=0.0):
    try:
        attn.set_backend(name)
        return varlen_attention(q, k, v, seg, scale, softcap)
    finally:
        attn.set_backend("auto")


@pytest.mark.parametrize("backend", ["torch", "blocked"])
@pytest.mark.parametrize("lengths", [(5,), (4, 4, 4), (3, 7, 3, 1, 7), (8, 8, 5)])
@pytest.mark.parametrize("softcap", [0.0, 30.0])
def test_backend_matches_reference(backend, lengths, softcap):
    q, k, v = _qkv(sum(lengths))
    seg = Segments(tuple(lengths), q.device)
    ref = _with_backend("reference", q, k, v, seg, 0.25, softcap)
    out = _with_backend(backend, q, k, v, seg, 0.25, softcap)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


# float32 rows of 7 keys are 28 bytes, a (sequence, head) pair's scores 196: these budgets run
# blocks of 2 pairs, then blocks of 3 query rows (3 + 3 + 1) of one pair, then single rows.
@pytest.mark.parametrize("budget", [400, 100, 1])
@pytest.mark.parametrize("size", [1.0, 0.05])  # logits of 4 and more (made exact), under 2 (kept rough)
def test_blocked_backend_splits_long_work_into_blocks(monkeypatch, budget, size):
    monkeypatch.setattr(attn, "BLOCK_SCORES_BYTES", budget)
    monkeypatch.setattr(attn, "ROW_BLOCK_SCORES_BYTES", budget)
    lengths = (3, 7, 3, 1, 7, 7)
    q, k, v = _qkv(sum(lengths), h=3)
    q = q * size
    seg = Segments(lengths, q.device)
    for scale in (0.25, 0.3):  # a power of two scales q exactly; any other scales the scores
        for softcap in (0.0, 30.0):
            ref = _with_backend("reference", q, k, v, seg, scale, softcap)
            out = _with_backend("blocked", q, k, v, seg, scale, softcap)
            torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("head_dim", [64, 72])  # So400m's 72: a scale that is no power of two
@pytest.mark.parametrize("size", [1.0, 0.05])
def test_blocked_backend_in_bfloat16_is_as_close_to_exact_as_sdpa(head_dim, size):
    """Scores of 10-20 (size 1), where rounding a plain bfloat16 matmul's scores would make the
    error five times SDPA's (measured); and under 2 (size 0.05), where the rough scores serve."""
    lengths = (256, 256, 100)
    q, k, v = _qkv(sum(lengths), h=4, d=head_dim, seed=3)
    q = q * size
    seg = Segments(lengths, q.device)
    q, k, v = (t.bfloat16() for t in (q, k, v))
    scale = head_dim**-0.5
    exact = _with_backend("reference", *(t.double() for t in (q, k, v)), seg, scale)
    error = {name: ((_with_backend(name, q, k, v, seg, scale).double() - exact).norm() / exact.norm()).item()
             for name in ("torch", "blocked")}
    assert error["blocked"] < 1.5 * error["torch"], error


@pytest.mark.parametrize("size", [1.0, 0.05])
def test_blocked_backend_copies_one_long_sequence_once_not_per_block(monkeypatch, size):
    """One sequence (a 3D asset, a video tile): q, k and v arrive as strided views into the qkv
    projection's rows. bmm copied a strided operand whole for every block of query rows, so an
    asset of 20,000 tokens copied K and V 770 times a head (a 3D /encode took 25 s, 18 of them
    copying). The copies made now do not depend on the number of blocks."""
    from torch.profiler import profile

    n, h, d = 512, 4, 64
    qkv = torch.randn(n, 3, h, d).bfloat16() * size
    q, k, v = qkv.unbind(1)  # [N, H, D] views, rows 3 x H x D apart, as SelfAttention passes them
    seg = Segments((n,), q.device)
    copies = {}
    for rows in (64, 8):  # 8 and 64 blocks of query rows per head
        monkeypatch.setattr(attn, "BLOCK_SCORES_BYTES", rows * n * 2)
        monkeypatch.setattr(attn, "ROW_BLOCK_SCORES_BYTES", rows * n * 2)
        with profile(record_shapes=True) as prof:
            _with_backend("blocked", q, k, v, seg, 0.125)
        # copies of a whole sequence's keys or values (the exact path also writes each block's
        # peak column: a copy of `rows` values, per block by design)
        copies[rows] = sum(e.count for e in prof.key_averages(group_by_input_shape=True)
                           if e.key == "aten::copy_" and e.input_shapes and e.input_shapes[0]
                           and math.prod(e.input_shapes[0]) >= n * d)
    assert copies[8] == copies[64] <= 3 * h + 4, copies


def test_auto_backend_is_blocked_only_for_bfloat16_on_a_cpu():
    x = torch.zeros(4, 2, 8)
    assert attn.resolve_backend(x.bfloat16()) == "blocked"
    assert attn.resolve_backend(x) == "torch"
    assert attn.resolve_backend(x.half()) == "torch"


def test_softcap_changes_peaky_attention():
    q, k, v = _qkv(12, seed=1)
    seg = Segments((12,), q.device)
    assert not torch.allclose(varlen_attention(q * 20, k, v, seg, 1.0, 0.0), varlen_attention(q * 20, k, v, seg, 1.0, 5.0))


def test_no_leakage_between_segments():
    q, k, v = _qkv(10)
    seg = Segments((4, 6), q.device)
    out = varlen_attention(q, k, v, seg, 0.25)
    k2, v2 = k.clone(), v.clone()
    k2[4:] += 5
    v2[4:] -= 3
    out2 = varlen_attention(q, k2, v2, seg, 0.25)
    torch.testing.assert_close(out[:4], out2[:4])
    assert not torch.allclose(out[4:], out2[4:])


def test_pool_matches_dense_single_query_attention():
    q1, k, v = _qkv(9)
    q = q1[:2]
    sample = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    out = segment_softmax_pool(q, k, v, sample, 2, 0.3)
    for b in range(2):
        ks, vs = k[sample == b], v[sample == b]
        w = ((ks * q[b]).sum(-1) * 0.3).softmax(0)  # [n, H]
        torch.testing.assert_close(out[b], (w[..., None] * vs).sum(0), rtol=1e-5, atol=1e-6)


def test_rope_depends_only_on_position_differences():
    head_dim = 72
    pos = torch.randint(0, 20, (6, 4)).float()
    q, k, _ = _qkv(6, h=1, d=head_dim)
    def scores(p):
        rot = rope_angles(p, head_dim)
        return apply_rope(q, rot)[:, 0] @ apply_rope(k, rot)[:, 0].T
    torch.testing.assert_close(scores(pos), scores(pos + torch.tensor([3.0, 1.0, 7.0, 2.0])), rtol=1e-4, atol=1e-4)


def test_rope_frequency_layout():
    # pair j rotates by pos[j // n] * 10000^(-(j % n) / D), n = D / 8
    angles = rope_angles(torch.tensor([[0.1, 0.2, 0.3, 0.4]]), 16).angle()[0]
    n = 2
    for j in range(8):
        expected = (j // n + 1) * 0.1 * 10000 ** (-(j % n) / 16)
        assert abs(float(angles[j]) - expected) < 1e-5


def test_pos_table_identity_at_native_size():
    table = LearnedPosTable(8)
    grid = table.grid(16, 16)
    torch.testing.assert_close(grid.reshape(256, 8), table.position_embedding.weight.detach())


def test_rope_rotates_interleaved_pairs():
    x = torch.randn(3, 2, 8)
    pos = torch.rand(3, 4)
    rot = rope_angles(pos, 8)
    out = apply_rope(x, rot)
    c, s = rot.real[:, None], rot.imag[:, None]
    x0, x1 = x[..., 0::2], x[..., 1::2]
    torch.testing.assert_close(out[..., 0::2], x0 * c - x1 * s)
    torch.testing.assert_close(out[..., 1::2], x0 * s + x1 * c)


def test_rope_leaves_its_input_alone_and_passes_gradients():
    # the rotation runs in place on its own float32 copy: never on the caller's tensor
    x = torch.randn(5, 2, 3, 16, requires_grad=True)
    before = x.detach().clone()
    rot = rope_angles(torch.rand(5, 4), 16)
    out = apply_rope(x, rot)
    torch.testing.assert_close(x.detach(), before, rtol=0, atol=0)
    out.square().sum().backward()
    # a rotation keeps norms: d/dx sum(|R x|^2) = 2x
    torch.testing.assert_close(x.grad, 2 * before, rtol=1e-5, atol=1e-5)
    half = apply_rope(x.detach().bfloat16(), rot)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), out.detach(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not attn.flash_available(), reason="needs flash-attn and a CUDA device")
def test_flash_backend_matches_torch_backend_on_gpu():
    lengths = (5, 64, 17, 64, 1)
    q, k, v = (t.cuda().bfloat16() for t in _qkv(sum(lengths), h=4, d=64))
    seg = Segments(lengths, q.device)
    try:
        for softcap in (0.0, 30.0):
            attn.set_backend("flash")
            fast = varlen_attention(q, k, v, seg, 0.125, softcap)
            attn.set_backend("torch")
            ref = varlen_attention(q, k, v, seg, 0.125, softcap)
            torch.testing.assert_close(fast.float(), ref.float(), rtol=2e-2, atol=2e-2)
    finally:
        attn.set_backend("auto")


def test_pool_states_of_pieces_merge_to_the_whole():
    from model.layers.attention import merge_pool_states, segment_softmax_state

    q1, k, v = _qkv(9)
    q = q1[:1]
    k[5:] += 4  # a later piece with larger logits: the merge must rescale the earlier one
    whole = segment_softmax_pool(q, k, v, torch.zeros(9, dtype=torch.long), 1, 0.3)
    pieces = [segment_softmax_state(q, k[a:b], v[a:b], torch.zeros(b - a, dtype=torch.long), 1, 0.3)
              for a, b in ((0, 2), (2, 5), (5, 9))]
    torch.testing.assert_close(merge_pool_states(pieces).normalized(), whole, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fused_mlp_matches_the_plain_path(dtype, tol):
    if dtype not in mlp.fused_dtypes():
        pytest.skip(f"oneDNN cannot fuse {dtype} on this CPU (or PyTorch was built without it)")
    torch.manual_seed(0)
    layer = Mlp(64, 256).to(dtype)
    x = torch.randn(37, 64).to(dtype)
    try:
        with torch.inference_mode():
            mlp.set_fused_mlp("off")
            plain = layer(x)
            mlp.set_fused_mlp("on")
            fused = layer(x)
    finally:
        mlp.set_fused_mlp("auto")
    torch.testing.assert_close(fused.float(), plain.float(), rtol=tol, atol=tol)
    if dtype == torch.bfloat16:  # the GELU meets the float32 accumulator: closer to the truth
        truth = Mlp(64, 256)
        truth.load_state_dict({k: v.float() for k, v in layer.state_dict().items()})
        with torch.no_grad():
            exact = truth(x.float())
        assert (fused.float() - exact).abs().mean() <= (plain.float() - exact).abs().mean()


def test_fused_mlp_falls_back_where_onednn_cannot_fuse_the_dtype(monkeypatch):
    # An AVX2-only CPU: oneDNN has float32 but no bfloat16 inner product, and calling it
    # anyway fails at the first pass ("could not create a primitive descriptor").
    monkeypatch.setattr(mlp, "fused_dtypes", lambda: (torch.float32,))
    layer = Mlp(8, 16).to(torch.bfloat16)
    x = torch.randn(3, 8, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert mlp._path(x) == "plain"
        plain = F.gelu(F.linear(x, layer.mlp[0].weight, layer.mlp[0].bias), approximate="tanh")
        assert torch.equal(layer(x), layer.mlp[2](plain))
        try:
            mlp.set_fused_mlp("on")
            with pytest.raises(ConfigError, match="bfloat16"):
                layer(x)
        finally:
            mlp.set_fused_mlp("auto")


def test_auto_fuses_bfloat16_only(monkeypatch):
    # In float32 the plain projection and GELU are the faster pair (docs/performance.md).
    monkeypatch.setattr(mlp, "fused_dtypes", lambda: (torch.float32, torch.bfloat16))
    x = torch.randn(3, 8)
    with torch.inference_mode():
        assert [mlp._path(x.bfloat16()), mlp._path(x), mlp._path(x.half())] == ["onednn", "sigmoid", "plain"]
        try:
            mlp.set_fused_mlp("on")
            assert mlp._path(x.bfloat16()) == mlp._path(x) == "onednn"
            mlp.set_fused_mlp("off")
            assert mlp._path(x.bfloat16()) == mlp._path(x) == "plain"
        finally:
            mlp.set_fused_mlp("auto")
    assert mlp._path(x) == "plain"  # training: the plain path, whose gradient is PyTorch's


def test_gelu_through_a_sigmoid_is_the_tanh_gelu():
    torch.manual_seed(0)
    y = torch.cat([torch.randn(4096) * 3, torch.tensor([0.0, -0.0, 1e-30, -1e-30, 40.0, -40.0, 1e4, -1e4])])
    exact = F.gelu(y.double(), approximate="tanh")
    ours, torchs = mlp.gelu_tanh_by_sigmoid(y), F.gelu(y, approximate="tanh")
    assert (ours.double() - exact).abs().max() <= 2 * (torchs.double() - exact).abs().max() + 1e-7
    torch.testing.assert_close(ours, torchs, rtol=2e-6, atol=1e-6)
    layer = Mlp(64, 256)
    x = torch.randn(37, 64)
    with torch.inference_mode():
        assert mlp._path(x) == "sigmoid"
        try:
            mlp.set_fused_mlp("off")
            plain = layer(x)
        finally:
            mlp.set_fused_mlp("auto")
        torch.testing.assert_close(layer(x), plain, rtol=1e-5, atol=1e-6)


def test_fused_mlp_keeps_gradients():
    layer = Mlp(8, 16)
    x = torch.randn(3, 8, requires_grad=True)
    layer(x).sum().backward()  # the fused op has no gradient: training takes the plain path
    assert x.grad is not None and layer.mlp[0].weight.grad is not None


def test_fused_mlp_mode_is_checked():
    with pytest.raises(Exception, match="unknown"):
        mlp.set_fused_mlp("fast")


def test_a_misspelt_switch_in_the_environment_is_an_error(monkeypatch):
    from model.errors import ConfigError
    from model.layers.switch import Switch

    monkeypatch.setenv("ATOKEN_TEST_SWITCH", "fsat")
    with pytest.raises(ConfigError, match="ATOKEN_TEST_SWITCH"):
        Switch("ATOKEN_TEST_SWITCH", ("auto", "fast"), "test switch")
    monkeypatch.setenv("ATOKEN_TEST_SWITCH", "fast")
    switch = Switch("ATOKEN_TEST_SWITCH", ("auto", "fast"), "test switch")
    assert switch.value == "fast"
    switch.set("auto")
    assert switch.value == "auto"


@pytest.mark.parametrize("size, per_block", [(0.02, False), (1.0, True)])
def test_blocked_backend_skips_the_peak_where_the_norms_bound_the_logits(monkeypatch, size, per_block):
    """|q.k| <= |q| |k|: where that keeps a pair's logits under ROUGH_LOGITS_MAX (small q, as in
    the shipped encoder), no pass over its scores looks for their peak; large logits still are."""
    from torch.profiler import profile

    monkeypatch.setattr(attn, "BLOCK_SCORES_BYTES", 64 * 64 * 2)  # a pair a block, as long sequences: 16
    lengths = (64,) * 4
    q, k, v = (t.bfloat16() for t in _qkv(sum(lengths), h=4, d=64, seed=5))
    seg = Segments(lengths, q.device)
    with profile() as prof:
        out = _with_backend("blocked", q * size, k, v, seg, 0.125)
    peaks = sum(e.count for e in prof.key_averages() if e.key == "aten::amax")
    assert peaks == (2 + 16 if per_block else 2), peaks  # the norms' two, then one per block
    exact = _with_backend("reference", *(t.double() for t in (q * size, k, v)), seg, 0.125)
    assert ((out.double() - exact).norm() / exact.norm()).item() < 0.01
