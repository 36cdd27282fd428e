"""The page at GET /, driven in Debian's headless Chromium through Playwright, against the real
service with the shipped default model. Screenshots of every step go to test-output/browser/
(or $ATOKEN_TEST_OUTPUT); `make screenshot` also refreshes the README's picture."""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service.routes.web import WEB_DIR
from tests import assets
from tests.service.server import LiveServer

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# The flags a closed network needs (no background connections) and a software WebGL for the splats.
CHROMIUM_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--enable-unsafe-swiftshader", "--use-angle=swiftshader"]
KEY = "browser-secret-key"
WAIT_MS = 240_000


@pytest.fixture(scope="module")
def shots() -> Path:
    out = Path(os.environ.get("ATOKEN_TEST_OUTPUT", ROOT / "test-output")) / "browser"
    out.mkdir(parents=True, exist_ok=True)
    return out


@pytest.fixture(scope="module")
def live():
    with LiveServer(worker="thread", variant=None) as server:
        yield server


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    assert Path(CHROMIUM).exists(), "Chromium is missing: `make chromium` installs Debian's package"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


class Page:
    """A tab with its console and the API's answers recorded."""

    def __init__(self, browser, url: str):
        self.tab = browser.new_page(viewport={"width": 1100, "height": 1300})
        self.console_errors: list[str] = []
        self.answers: list = []
        self.requests: list = []
        self.tab.on("console", lambda m: m.type == "error" and self.console_errors.append(m.text))
        self.tab.on("pageerror", lambda e: self.console_errors.append(f"uncaught: {e}"))
        self.tab.on("response", lambda r: self.answers.append(r))
        self.tab.on("request", lambda r: self.requests.append(r))
        self.tab.goto(url + "/")
        self.tab.wait_for_selector("#model:not(:has-text('Loading'))")

    def upload(self, *paths: Path | tuple[str, bytes]) -> None:
        files = [{"name": p[0], "mimeType": "application/octet-stream", "buffer": p[1]} if isinstance(p, tuple)
                 else str(p) for p in paths]
        self.tab.set_input_files("#files", files)

    def wait_settled(self, count: int) -> None:
        self.tab.wait_for_function(
            "n => document.querySelectorAll('.item[data-state=done], .item[data-state=error]').length >= n",
            arg=count, timeout=WAIT_MS)

    def card(self, name: str):
        return self.tab.locator(".item", has=self.tab.locator(".name", has_text=name))

    def fact(self, name: str, key: str) -> str:
        return self.card(name).locator(f"dd[data-fact={key}]").inner_text()

    def answer(self, path: str, index: int = -1):
        return [a for a in self.answers if a.url.split("?")[0].endswith(path)][index]

    def shot(self, folder: Path, name: str) -> Path:
        path = folder / f"{name}.png"
        self.tab.screenshot(path=str(path), full_page=True)
        return path


def _pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16)


def _save_docs_screenshot(tab, target: str) -> None:
    """A small PNG of the page's top for the README (palette-quantised to keep the repo small)."""
    png = tab.screenshot(clip={"x": 0, "y": 0, "width": 1100, "height": 1000})
    picture = Image.open(io.BytesIO(png)).convert("RGB")
    picture = picture.resize((770, 700), Image.LANCZOS).quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    path = ROOT / target
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path, optimize=True)


def test_page_is_self_contained_and_the_vendored_viewer_is_the_pinned_package(live):
    with live.client() as c:
        page = c.get("/")
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert "default-src 'self'" in page.headers["content-security-policy"]
        # Nothing is fetched from the internet: every script and stylesheet is on this origin.
        assert not re.search(r'(src|href)="(https?:)?//', page.text)
        script = c.get("/web/vendor/gsplat/index.es.js")
        assert script.status_code == 200 and "javascript" in script.headers["content-type"]
        assert "/" not in c.get("/openapi.json").json()["paths"]  # the page is not part of the API
    record = json.loads((WEB_DIR / "vendor" / "VENDORED.json").read_text())
    lock = json.loads((WEB_DIR / "vendor" / "package-lock.json").read_text())
    for package, entry in record.items():
        pinned = lock["packages"][f"node_modules/{package}"]
        assert entry["version"] == pinned["version"] and entry["integrity"] == pinned["integrity"]
        assert entry["license"] and (WEB_DIR / "vendor" / package / "LICENSE").is_file()
        for target, digest in entry["sha256"].items():
            assert hashlib.sha256((WEB_DIR / "vendor" / target).read_bytes()).hexdigest() == digest, target


def test_walkthrough_images_reconstructions_tokens_and_similarity(live, browser, shots):
    page = Page(browser, live.url)
    page.shot(shots, "01-empty")
    photos = [assets.image("chelsea.png"), assets.image("coffee.png")]
    page.upload(*photos)
    page.wait_settled(2)
    page.tab.wait_for_selector("#similarity-table td")
    page.shot(shots, "02-images")

    for position, photo in enumerate(photos):  # the page sends one file at a time, in order
        answer = page.answer("/reconstruct", position)
        header = answer.headers["x-round-trip-psnr"]
        assert page.fact(photo.name, "psnr") == f"{header} dB"
        assert float(header) > 25  # the shipped default on its own training-free test photos
        assert page.fact(photo.name, "tokens") == answer.headers["x-tokens"]
        assert page.fact(photo.name, "grid") == answer.headers["x-token-grid"]
        # The token picture: one pixel per token, coloured by the latents' principal components.
        grid = [int(v) for v in answer.headers["x-token-grid"].split("x")]
        frame = page.card(photo.name).locator("canvas.token-frame").first
        assert frame.evaluate("c => [c.width, c.height]") == [grid[2], grid[1]]
        assert _pixels(frame.screenshot()).std() > 10
        # The wipe shows the input on the left and the reconstruction on the right.
        assert page.card(photo.name).locator("img.input-media").count() == 1
        assert page.card(photo.name).locator("img.reconstruction-media").evaluate("i => i.naturalWidth") > 0

    cells = page.tab.locator("#similarity-table td")
    shown = np.array([float(v) for v in cells.evaluate_all("cs => cs.map(c => c.dataset.value)")]).reshape(2, 2)
    with live.client() as c:
        emb = {p.name: np.array(c.post("/encode", files={"file": (p.name, p.read_bytes())}).json()["items"][0]
                                ["embedding"]) for p in photos}
    names = page.tab.locator("#similarity-table tr:first-child th").all_inner_texts()[1:]
    expected = np.array([[emb[a] @ emb[b] / np.linalg.norm(emb[a]) / np.linalg.norm(emb[b]) for b in names]
                         for a in names])
    assert np.allclose(shown, expected, atol=1e-5) and np.allclose(np.diag(shown), 1, atol=1e-5)
    assert page.console_errors == []
    if os.environ.get("ATOKEN_DOCS_SCREENSHOT"):
        page.tab.evaluate("() => window.scrollTo(0, 0)")
        _save_docs_screenshot(page.tab, os.environ["ATOKEN_DOCS_SCREENSHOT"])


def test_mesh_shows_gaussians_in_an_orbiting_splat_viewer(live, browser, shots):
    page = Page(browser, live.url)
    page.upload(assets.mesh("cow.obj"))
    page.wait_settled(1)
    card = page.card("cow.obj")
    assert card.get_attribute("data-state") == "done", card.inner_text()
    assert card.locator(".kind").inner_text() == "3D"
    download = card.locator("a.download")
    assert download.get_attribute("download").endswith(".ply")
    canvas = card.locator("canvas.splat-canvas")
    time.sleep(1.5)  # the viewer fades the splats in
    before = _pixels(canvas.screenshot())
    page.shot(shots, "03-mesh")
    background = np.array([255, 255, 255])
    drawn = np.abs(before - background).sum(-1) > 30
    assert drawn.mean() > 0.02, f"only {drawn.mean():.3%} of the canvas shows splats"
    box = canvas.bounding_box()
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.tab.mouse.move(x, y)
    # Few events: each waits for a frame, and software WebGL takes seconds to draw one.
    page.tab.mouse.down()
    page.tab.mouse.move(x + 120, y + 30, steps=2)
    page.tab.mouse.up()
    time.sleep(1.0)
    after = _pixels(canvas.screenshot())
    page.shot(shots, "04-mesh-orbited")
    assert np.abs(after - before).mean() > 1.0, "the view did not change after a drag"
    # The download is the PLY the API answered.
    size, head = page.tab.evaluate(
        "href => fetch(href).then(r => r.blob()).then(async b => [b.size, await b.slice(0, 40).text()])",
        download.get_attribute("href"))
    assert size == int(page.answer("/reconstruct").headers["content-length"])
    assert head.startswith("ply\nformat binary_little_endian")
    assert page.console_errors == []


def _video_job(page: Page, folder: Path, seconds: float):
    """Upload a clip with sound; returns it and its card's cancel button once its job runs."""
    clip = folder / f"clip{seconds:g}s.mp4"
    clip.write_bytes(assets.clip_with_audio(seconds))
    page.upload(clip)
    cancel = page.card(clip.name).locator("button.cancel")
    cancel.wait_for(timeout=WAIT_MS)
    return clip, cancel


def test_a_video_goes_through_the_job_api_with_progress_and_plays_in_sync(live, browser, shots, tmp_path):
    page = Page(browser, live.url)
    clip, _ = _video_job(page, tmp_path, 8)
    page.tab.wait_for_selector(".item[data-state=done]", timeout=WAIT_MS)
    submitted = page.answer("/jobs/reconstruct")
    assert submitted.status == 202
    polls = [a for a in page.answers if "/jobs/" in a.url and a.request.method == "GET" and a.ok]
    assert any(a.url.endswith("/result") for a in polls)
    shown = page.fact(clip.name, "psnr")
    assert shown == f"{page.answer('/result').headers['x-round-trip-psnr']} dB"
    page.card(clip.name).locator("button.play").click()
    time.sleep(1.5)
    state = page.card(clip.name).locator("video").evaluate_all(
        "vs => vs.map(v => ({ready: v.readyState, time: v.currentTime, paused: v.paused}))")
    assert all(v["ready"] >= 2 and not v["paused"] and v["time"] > 0.3 for v in state), state
    assert abs(state[0]["time"] - state[1]["time"]) < 0.25, state
    page.shot(shots, "05-video")
    assert page.console_errors == []


def test_a_long_video_can_be_cancelled_from_the_page(live, browser, shots, tmp_path):
    page = Page(browser, live.url)
    _, cancel = _video_job(page, tmp_path, 60)
    page.tab.wait_for_function("() => /[1-9][0-9]* of [0-9]+ tiles/.test(document.querySelector('.item .status').textContent)")
    page.shot(shots, "06-video-progress")
    cancel.click()
    page.tab.wait_for_selector(".item[data-state=cancelled]", timeout=WAIT_MS)
    job_url = page.answer("/jobs/reconstruct").json()["links"]["self"]
    with live.client() as c:
        deadline = time.monotonic() + 30
        while c.get(job_url).json()["status"] != "cancelled" and time.monotonic() < deadline:
            time.sleep(0.1)
        job = c.get(job_url).json()
    assert job["status"] == "cancelled" and job["progress"]["done"] < job["progress"]["total"]
    # The browser logs the 410 the page then explained as "Cancelled".
    assert [e for e in page.console_errors if "status of 410" not in e] == []


def test_corrupt_file_shows_the_apis_message_and_the_next_file_still_works(live, browser, shots):
    page = Page(browser, live.url)
    page.upload(("broken.png", b"\x89PNG\r\n\x1a\n" + b"\x00garbage" * 64))
    page.wait_settled(1)
    refusal = page.answer("/reconstruct")
    assert 400 <= refusal.status < 500
    message = refusal.json()["error"]["message"]
    shown = page.card("broken.png").locator(".error")
    assert shown.is_visible() and message in shown.inner_text()
    page.shot(shots, "07-corrupt")
    page.upload(assets.image("astronaut.png"))
    page.wait_settled(2)
    assert page.card("astronaut.png").get_attribute("data-state") == "done"
    assert [e for e in page.console_errors if f"status of {refusal.status}" not in e] == []


def test_api_key_is_asked_for_and_sent_only_as_a_header(browser, shots):
    # A low frame limit here also shows the page's way round it: the first frames, on request.
    with LiveServer(worker="thread", variant=None, api_keys=KEY, max_frames=64) as keyed:
        page = Page(browser, keyed.url)
        assert page.tab.locator("#auth").is_visible()
        photo = assets.image("chelsea.png")
        page.upload(photo)
        page.wait_settled(1)
        assert page.answer("/reconstruct").status == 401
        assert "API key" in page.card(photo.name).locator(".error").inner_text()
        page.tab.fill("#api-key", KEY)
        page.tab.click("#key-form button")
        page.card(photo.name).locator(".remove").click()
        page.upload(photo)
        page.wait_settled(1)
        assert page.card(photo.name).get_attribute("data-state") == "done"
        page.shot(shots, "08-keyed")
        sent = [r for r in page.requests if "/reconstruct" in r.url]
        assert sent[-1].headers.get("authorization") == f"Bearer {KEY}"
        assert all(KEY not in r.url for r in page.requests)
        assert KEY not in page.tab.content()
        clip = assets.video("carphone_pristine.mp4")  # 120 frames, over this server's 64
        page.upload(clip)
        retry = page.card(clip.name).locator("button.retry")
        retry.wait_for(timeout=WAIT_MS)
        assert "64 frames" in page.card(clip.name).locator(".error").inner_text()
        retry.click()
        page.tab.wait_for_function("n => document.querySelectorAll('.item[data-state=done]').length >= n",
                                   arg=2, timeout=WAIT_MS)
        assert "max_frames=64" in page.answer("/jobs/reconstruct").url
        page.shot(shots, "09-video-first-frames")
        assert all(KEY not in r.url for r in page.requests)
        assert [e for e in page.console_errors if "status of 401" not in e and "status of 413" not in e] == []
