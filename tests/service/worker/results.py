"""Comparing the results of the same jobs run two ways (lanes, slots), up to float rounding."""

import torch


def assert_results_close(expected: list, got: list, rtol: float = 1e-5, atol: float = 1e-5) -> None:
    assert [r.id for r in got] == [r.id for r in expected]
    for a, b in zip(expected, got):
        assert a.error is None and b.error is None
        for field in ("embedding", "tubelets"):
            x, y = getattr(a, field), getattr(b, field)
            assert (x is None) == (y is None)
            if x is not None:
                torch.testing.assert_close(y, x, rtol=rtol, atol=atol)
        if a.tokens is not None:
            torch.testing.assert_close(b.tokens.latents, a.tokens.latents, rtol=rtol, atol=atol)
