"""Heavy inputs (videos, meshes) are pre-processed in their own pool: while it is full, small
images and JSON bodies are still served."""

import concurrent.futures as cf
import threading

from tests import assets
from tests.service.server import LiveServer

JPG = assets.image("rocket.jpg").read_bytes()
VIDEO = assets.video("bikes.mp4").read_bytes()
MESH = assets.mesh("cow.obj").read_bytes()


def test_images_are_served_while_every_heavy_thread_is_busy():
    with LiveServer(worker="thread", max_side=256) as live:
        runtime = live.runtime
        assert runtime._pool_for(JPG) is runtime.light_pool
        assert runtime._pool_for(VIDEO) is runtime.heavy_pool and runtime._pool_for(MESH) is runtime.heavy_pool
        release = threading.Event()
        blockers = [runtime.heavy_pool.submit(release.wait, 60) for _ in range(runtime.heavy_pool._max_workers)]
        try:
            with live.client() as c, cf.ThreadPoolExecutor(1) as pool:
                video = pool.submit(c.post, "/encode?max_frames=8", files={"file": ("v.mp4", VIDEO)})
                for _ in range(3):  # the heavy pool is full: the video waits, images do not
                    r = c.post("/encode", files={"file": ("a.jpg", JPG)})
                    assert r.status_code == 200
                assert not video.done()
                release.set()
                assert video.result(60).status_code == 200
        finally:
            release.set()
            cf.wait(blockers)
