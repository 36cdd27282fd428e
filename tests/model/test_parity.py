"""Golden data from the official AToken code: every tensor must match."""

import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from model.parity import run_case
from tests.conftest import PARITY_DIR, ROOT, parity_cases

CASES = parity_cases()
needs_cases = pytest.mark.skipif(not CASES, reason=f"no parity cases in {PARITY_DIR}")


@needs_cases
@pytest.mark.parametrize("case", CASES, ids=lambda p: p.name)
def test_case_matches_official(case):
    rows = run_case(case)
    assert rows, "the case produced no comparisons"
    failed = [f"{r.name}: rel {r.rel:.2e}" for r in rows if not r.passed]
    assert not failed, failed
    names = {r.name.rsplit("/", 1)[-1] for r in rows}
    # Every stage of the pipeline is covered, not only the final output.
    if (case / "config.yaml").read_text().find("model_cfg") >= 0:
        assert {"sparse.feats", "enc.x_no_proj", "enc.image_feat", "dec.rec_feats", "end_to_end.rec_feats"} <= names


@needs_cases
def test_cli_last_line_and_exit_status():
    proc = subprocess.run([sys.executable, "-m", "model.parity", *map(str, CASES)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    last = proc.stdout.strip().splitlines()[-1]
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert last.startswith("parity: passed max_rel_err=") and " tensors=" in last


@needs_cases
def test_cli_fails_on_a_perturbed_weight(tmp_path):
    case = tmp_path / "soc_perturbed"
    shutil.copytree(PARITY_DIR / "soc_small", case)
    weights = load_file(str(case / "model.safetensors"))
    weights["decoder.blocks.0.attn.to_out.weight"] *= 1.01
    save_file(weights, str(case / "model.safetensors"))
    proc = subprocess.run([sys.executable, "-m", "model.parity", str(case)], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1
    assert proc.stdout.strip().splitlines()[-1].startswith("parity: failed")
    assert "FAIL" in proc.stdout


@needs_cases
def test_packed_batch_equals_one_at_a_time():
    """Images of two sizes, a video spanning two temporal tiles and a 3D object in one batch."""
    from model.parity import load_case_model
    from model.patchify import frames_to_sparse, voxels_to_sparse
    from model.sparse import cat

    model, _ = load_case_model(PARITY_DIR / "soc_small")
    g = load_file(str(PARITY_DIR / "soc_small" / "batch_128x128_64x96.safetensors"))
    v = load_file(str(PARITY_DIR / "soc_small" / "video_22f_48x64.safetensors"))
    d = load_file(str(PARITY_DIR / "soc_small" / "voxels3d_80.safetensors"))
    frames = [g["input.pixels.0"], v["input.pixels.0"], g["input.pixels.1"]]
    singles = [frames_to_sparse([f])[0] for f in frames] + [voxels_to_sparse([(d["input.coords_raw"],
                                                                               d["input.feats_raw"])])]
    packed = cat(singles)
    with torch.no_grad():
        whole = model(packed)
        for b, single in enumerate(singles):
            alone = model(single)
            mask = packed.coords[:, 0] == b
            torch.testing.assert_close(whole["reconstruction"][mask], alone["reconstruction"], rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(whole["embedding"][b], alone["embedding"][0], rtol=1e-5, atol=1e-6)
            torch.testing.assert_close(whole["posterior"][mask], alone["posterior"], rtol=1e-5, atol=1e-5)


@needs_cases
def test_bfloat16_tracks_the_official_float32_outputs():
    """bf16 is the CPU fast path: the goldens hold to ~1e-2 relative (README of the cases)."""
    from model.parity import load_case_model
    from model.sparse import SparseBatch

    model, _ = load_case_model(PARITY_DIR / "soc_small")
    model = model.to(torch.bfloat16)
    g = load_file(str(PARITY_DIR / "soc_small" / "batch_128x128_64x96.safetensors"))
    batch = SparseBatch(g["sparse.feats"], g["sparse.coords"], ("image", "image"))
    with torch.no_grad():
        enc = model.encode(batch)
        rec = model.decode(batch.with_feats(g["dec.latent"]))
    for ours, golden in ((enc.posterior, g["enc.posterior"]), (rec, g["dec.rec_feats"]),
                         (enc.embedding, g["enc.image_feat"])):
        rel = ((ours.float() - golden).norm() / golden.norm()).item()
        assert rel < 2e-2, rel
