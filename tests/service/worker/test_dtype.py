"""The default dtype per device, and bfloat16 kept within its documented bounds of float32."""

from dataclasses import replace

import pytest
import torch

from service.inputs import Options
from service.pipeline import preprocess, round_trip_psnr
from service.settings import Settings
from service.worker import loader
from service.worker.backends import LocalBackend
from service.worker.jobs import Job
from service.worker.loader import resolve_dtype
from tests import assets

# Documented in docs/performance.md ("bfloat16 where the hardware has it").
MIN_EMBEDDING_COSINE = 0.9995
MIN_LATENT_COSINE = 0.9999
MAX_PSNR_DROP_DB = 0.1


def test_explicit_dtypes_are_kept():
    for dtype in ("float32", "bfloat16", "float16"):
        assert resolve_dtype(dtype, "cpu") == dtype


@pytest.mark.parametrize("dtype, has_units", [("float16", "cpu_has_fp16"), ("bfloat16", "cpu_has_bf16")])
def test_a_dtype_on_a_cpu_without_its_units_is_served_with_a_warning_once(monkeypatch, caplog, dtype, has_units):
    monkeypatch.setattr(loader, has_units, lambda: False)
    loader._warn_emulated.cache_clear()
    with caplog.at_level("WARNING", logger="atoken.worker"):
        assert resolve_dtype(dtype, "cpu") == dtype
        assert resolve_dtype(dtype, "cpu") == dtype  # the discrete model's load: no second warning
        assert resolve_dtype("float32", "cpu") == "float32"
        assert resolve_dtype(dtype, "cuda") == dtype
    assert [r.getMessage() for r in caplog.records] == [
        f"ATOKEN_DTYPE={dtype} on a CPU without {dtype} units is emulated and several times slower than float32; "
        "use auto or float32"]
    caplog.clear()
    monkeypatch.setattr(loader, has_units, lambda: True)
    loader._warn_emulated.cache_clear()
    resolve_dtype(dtype, "cpu")
    assert not caplog.records


def test_auto_follows_the_machine_that_loads_the_model(monkeypatch):
    spec = Settings(dtype="auto", variant="tiny").model_spec
    assert spec.dtype == "auto"  # resolved where the model loads, not where settings are read
    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    assert loader.load_tokenizers(spec)["continuous"].info.dtype == "bfloat16"
    monkeypatch.setattr(loader, "cpu_has_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32"
    assert loader.load_tokenizers(spec)["continuous"].info.dtype == "float32"


def test_auto_on_a_gpu_needs_bf16_support():
    expected = "bfloat16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "float32"
    assert resolve_dtype("auto", "cuda") == expected


def test_bfloat16_stays_within_its_bounds_of_float32():
    settings = Settings(dtype="float32")
    items = [preprocess(assets.image(name).read_bytes(), Options(), settings.limits)
             for name in ("astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg")]
    answers = {}
    # Any speed: these passes are not priced, and timing them took 18 s of emulated bfloat16 on
    # an AVX2 CPU.
    known = {"work": {"per_s": 10000.0, "decoder_pass": 1.0, "attention_crossover": 3000.0}}
    for dtype in ("float32", "bfloat16"):
        backend = LocalBackend(replace(settings.model_spec, dtype=dtype), calibration=known)
        assert backend.start()["dtype"] == dtype
        jobs = [Job(i, op, batch=it.batch, embedding=True) for op in ("reconstruct", "tokenize") for i, it in enumerate(items)]
        answers[dtype] = backend.run(jobs)
    n = len(items)
    for k, item in enumerate(items):
        exact, fast = answers["float32"][k], answers["bfloat16"][k]
        cos = torch.nn.functional.cosine_similarity
        assert cos(exact.embedding, fast.embedding, dim=0) >= MIN_EMBEDDING_COSINE
        exact_tokens, fast_tokens = answers["float32"][n + k].tokens, answers["bfloat16"][n + k].tokens
        assert cos(exact_tokens.latents.flatten(), fast_tokens.latents.flatten(), dim=0) >= MIN_LATENT_COSINE
        assert round_trip_psnr(item, exact) - round_trip_psnr(item, fast) <= MAX_PSNR_DROP_DB


@pytest.mark.skipif(not loader.cpu_has_bf16(), reason="this CPU has no bf16 units: auto serves float32 here")
def test_this_cpu_serves_bfloat16_by_default():
    assert resolve_dtype(Settings().dtype, Settings().device) == "bfloat16"
