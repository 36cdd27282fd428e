import pytest
import torch

from model.api import ATokenizer
from model.cuda_graphs import BucketedEncoder
from model.errors import TokenLimitError
from model.patchify import frames_to_sparse


def _batch():
    return frames_to_sparse([torch.rand(32, 48, 3) * 2 - 1, torch.rand(20, 32, 32, 3) * 2 - 1,
                             torch.rand(64, 64, 3) * 2 - 1])[0]


def test_padding_to_a_bucket_changes_nothing():
    tok = ATokenizer.from_variant("tiny", seed=0)
    batch = _batch()
    bucketed = BucketedEncoder(tok.model, capture=False)
    assert bucketed.bucket_for(batch.batch_size, batch.num_tokens) == (4, 1024)
    with torch.no_grad():
        ref = tok.model.encode(batch)
        out = bucketed.encode(batch)
    torch.testing.assert_close(out.features, ref.features, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.posterior, ref.posterior, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.embedding, ref.embedding, rtol=1e-5, atol=1e-6)


def test_batch_beyond_the_largest_bucket_is_refused():
    tok = ATokenizer.from_variant("tiny", seed=0)
    with pytest.raises(TokenLimitError):
        BucketedEncoder(tok.model, buckets=((1, 16),), capture=False).encode(_batch())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_captured_graph_matches_eager_on_gpu():
    from model.layers.attention import flash_available

    if not flash_available():
        pytest.skip("flash-attn not installed")
    tok = ATokenizer.from_variant("tiny", seed=0).to(device="cuda", dtype="bfloat16")
    batch = _batch()
    graphed = BucketedEncoder(tok.model, capture=True)
    with torch.no_grad():
        ref = tok.model.encode(batch)
        for _ in range(2):  # capture, then replay
            out = graphed.encode(batch)
    assert torch.nn.functional.cosine_similarity(out.embedding, ref.embedding).min() > 0.999
