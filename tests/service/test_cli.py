import json
import subprocess
import sys

from PIL import Image

from tests import assets
from tests.conftest import ROOT


def _run(*args, tmp_path, **settings):
    env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "ATOKEN_MAX_SIDE": "128", "ATOKEN_VARIANT": "tiny",
           **{f"ATOKEN_{k.upper()}": v for k, v in settings.items()}}
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


def test_bad_settings_stop_serve_at_once_naming_the_variable(tmp_path):
    proc = _run("serve", "--port", "1", tmp_path=tmp_path, worker="triton")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ATOKEN_WORKER=triton needs ATOKEN_TRITON_URL" in proc.stderr
    proc = _run("serve", "--port", "1", tmp_path=tmp_path, max_upload_bytes="lots", triton_protocol="udp")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ATOKEN_MAX_UPLOAD_BYTES" in proc.stderr and "'lots'" in proc.stderr
    assert "ATOKEN_TRITON_PROTOCOL: Input should be 'http' or 'grpc'" in proc.stderr


def _frames(path) -> int:
    import av

    with av.open(str(path)) as c:
        return sum(1 for _ in c.decode(video=0))


def test_cli_streams_a_video_with_a_progress_bar(tmp_path):
    clip = tmp_path / "clip.mp4"
    clip.write_bytes(assets.clip_with_audio(3))
    out = tmp_path / "rec.mp4"
    proc = _run("reconstruct", str(clip), "-o", str(out), "--progress", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert _frames(out) == 90 and "6/6" in proc.stderr and "tile/s" in proc.stderr  # 90 frames: 6 tiles


def test_cli_follows_a_job_on_a_server(tmp_path):
    from tests.service.server import LiveServer

    clip = tmp_path / "clip.mp4"
    clip.write_bytes(assets.clip_with_audio(2))
    out = tmp_path / "rec.mp4"
    with LiveServer(worker="thread", max_side=128, api_keys="cli-key") as live:
        proc = _run("reconstruct", str(clip), "-o", str(out), "--server", live.url, "--api-key", "cli-key",
                    "--progress", tmp_path=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert _frames(out) == 60 and "PSNR" in proc.stdout and "4/4" in proc.stderr
        refused = _run("encode", str(clip), "--server", live.url, tmp_path=tmp_path)
        assert refused.returncode == 2 and "error (401)" in refused.stderr


def test_the_dataset_summary_counts_in_the_singular_and_plural():
    from service.cli import dataset_summary

    one = {"items": 1, "seconds": 3.94, "items_per_s": 0.254, "tokens_per_s": 135.2, "rows": 1, "errors": 1,
           "skipped_shards": 1}
    assert dataset_summary(one) == ("1 input in 3.9 s (0.3 items/s, 135 tokens/s): 1 row, 1 error, "
                                    "1 finished shard skipped")
    many = {**one, "items": 5, "rows": 4, "errors": 0, "skipped_shards": 0}
    assert dataset_summary(many).endswith("): 4 rows, 0 errors")
    assert dataset_summary({**many, "skipped_shards": 2}).endswith(", 2 finished shards skipped")
