"""Work a caller gives up on is cancelled, and how it ends is read, not left to a finalizer."""

import asyncio
import gc
import logging

from service.runtime import abandon


def _left_behind(stop) -> None:
    """A task cancelled while it waits, whose clean-up then fails (as a streamed reconstruction's
    does when the service's pools have shut down), stopped with `stop`."""
    async def work():
        try:
            await asyncio.sleep(10)
        finally:
            raise RuntimeError("cannot schedule new futures after shutdown")

    async def main():
        task = asyncio.ensure_future(work())
        await asyncio.sleep(0)
        stop(task)
        await asyncio.sleep(0.01)

    asyncio.run(main())
    gc.collect()


UNREAD = "coro=<_left_behind.<locals>.work()"  # how the finalizer names this test's task


def test_abandoned_work_that_fails_while_winding_down_is_read(caplog):
    gc.collect()  # what earlier tests left for the collector is not this test's to report
    caplog.clear()
    with caplog.at_level(logging.DEBUG):
        _left_behind(abandon)
    assert UNREAD not in caplog.text
    assert "abandoned work ended with RuntimeError" in caplog.text
    caplog.clear()
    _left_behind(lambda task: task.cancel())  # what the routes did: the finalizer reports it
    assert "Task exception was never retrieved" in caplog.text and UNREAD in caplog.text
