import pytest

from tests.service.server import LiveServer


@pytest.fixture(scope="session")
def server():
    """The default setup: process worker, untrained tiny model (or the shipped default)."""
    with LiveServer(worker="process", max_wait_ms=40, max_side=256) as live:
        yield live


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
