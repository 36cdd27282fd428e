"""One shard's work: a long video streams through the model, its tiles let go as they run."""

from __future__ import annotations

import weakref

import numpy as np

from service.bulk.pipeline import ShardRunner
from service.bulk.prepare import prepare
from service.bulk.sources import Entry
from service.inputs import Options
from service.media.limits import MediaLimits
from service.worker.backends import LocalBackend
from service.worker.loader import ModelSpec
from tests import assets


def test_a_videos_tiles_are_let_go_as_their_batches_run(tmp_path):
    """A row keeps its tokens, not its tiles' pixels: when a batch runs, no earlier batch's
    input is alive any more (up to 36,000 frames are allowed; held, they would not fit)."""
    data = assets.clip_with_audio(3.0)
    path = tmp_path / "talk.mp4"
    path.write_bytes(data)
    prepared = prepare(Entry("talk.mp4", str(path), size=len(data)), Options(), MediaLimits(max_side=128))
    backend = LocalBackend(ModelSpec(variant="tiny"))
    backend.start()
    inputs, alive_at_each_batch = [], []
    run = backend.run

    def recording_run(jobs):
        alive_at_each_batch.append(sum(ref() is not None for ref in inputs))
        inputs.extend(weakref.ref(job.batch.feats) for job in jobs)
        return run(jobs)

    backend.run = recording_run
    runner = ShardRunner(backend, "continuous", False, 1, np.dtype(np.float16))  # a batch per tile
    rows, errors = runner.run(iter([prepared]))
    assert not errors and len(alive_at_each_batch) >= 3
    assert alive_at_each_batch == [0] * len(alive_at_each_batch)
    (row,) = rows
    assert row["values"].dtype == np.float16 and row["values"].shape[0] == row["coords"].shape[0] == runner.tokens
    times = np.unique(row["coords"][:, 0])
    assert times.tolist() == list(range(len(times)))  # tiles count t on from the one before
