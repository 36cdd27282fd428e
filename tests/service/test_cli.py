import json
import subprocess
import sys

from PIL import Image

from tests import assets
from tests.conftest import ROOT


def _run(*args, tmp_path):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ATOKEN_MAX_SIDE": "128", "ATOKEN_VARIANT": "tiny"}
    return subprocess.run([sys.executable, "-m", "service", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


def test_cli_reconstruct_and_tokenize(tmp_path):
    out = tmp_path / "rec.png"
    proc = _run("reconstruct", str(assets.image("chelsea.png")), "-o", str(out), tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "PSNR" in proc.stdout and Image.open(out).size == (451, 300)
    proc = _run("tokenize", str(assets.image("rocket.jpg")), tmp_path=tmp_path)
    doc = json.loads(proc.stdout)
    assert doc["items"][0]["kind"] == "image" and doc["items"][0]["num_tokens"] > 0


def test_cli_reports_bad_input(tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"nope")
    proc = _run("encode", str(bad), tmp_path=tmp_path)
    assert proc.returncode == 2 and "error (415)" in proc.stderr
