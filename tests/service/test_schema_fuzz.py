"""Schemathesis (property-based API fuzzing) against the real service and its /openapi.json:
no 5xx, no undocumented status or content type, responses conforming to their schemas, 405s
with Allow, 401s when a key is missing. A fixed seed and a bounded number of examples make
the run repeatable and short."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.service.process_server import ServerProcess

CONFIG = Path(__file__).with_name("schemathesis.toml")
EXAMPLES = 40


def _schemathesis() -> str:
    found = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if not found:
        pytest.fail("schemathesis is not installed (make test installs the dev extras)")
    return found


@pytest.mark.parametrize("keys", [False, True], ids=["open", "api-keys"])
def test_schemathesis_finds_nothing(tmp_path, keys):
    settings = {"api_keys": "fuzz-key"} if keys else {}
    with ServerProcess(tmp_path, max_side=128, max_frames=16, **settings) as live:
        command = [_schemathesis(), "--config-file", str(CONFIG), "--no-color", "run", f"{live.url}/openapi.json",
                   "--checks", "all", "--exclude-checks", "positive_data_acceptance", "--seed", "20261129", "--max-examples", str(EXAMPLES), "--workers", "1",
                   "--generation-database", "none", "--request-timeout", "60", "--phases", "coverage,fuzzing"]
        if keys:
            command += ["-H", "Authorization: Bearer fuzz-key"]
        run = subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=tmp_path)
        report = run.stdout[-6000:] + run.stderr[-2000:]
        assert run.returncode == 0, report
        assert "generated" in run.stdout and " 0 passed" not in run.stdout, report
        assert live.ready()
