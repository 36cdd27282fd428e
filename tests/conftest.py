import os
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
PARITY_DIR = Path(os.environ.get("ATOKEN_PARITY_DIR", ROOT.parent / "shared" / "parity"))


def parity_cases() -> list[Path]:
    if not PARITY_DIR.is_dir():
        return []
    return sorted(p for p in PARITY_DIR.iterdir() if (p / "manifest.json").is_file())


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_collection_modifyitems(config, items):
    if os.environ.get("ATOKEN_SLOW_TESTS") == "1":
        return
    skip = pytest.mark.skip(reason="slow: opt in with ATOKEN_SLOW_TESTS=1 (make test-slow)")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
