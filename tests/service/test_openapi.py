"""The API contract: paths, methods, request content types and summaries are pinned.

Regenerate after a deliberate change with ATOKEN_UPDATE_SNAPSHOTS=1.
"""

import json
import os
from pathlib import Path

from service.app import create_app
from service.settings import Settings

SNAPSHOT = Path(__file__).with_name("openapi_snapshot.json")


def contract() -> dict:
    spec = create_app(Settings(worker="thread")).openapi()
    out = {}
    for path, methods in sorted(spec["paths"].items()):
        for method, op in sorted(methods.items()):
            out[f"{method.upper()} {path}"] = {
                "summary": op.get("summary"),
                "request": sorted(op.get("requestBody", {}).get("content", {})),
            }
    return out


def test_openapi_matches_snapshot():
    current = contract()
    if os.environ.get("ATOKEN_UPDATE_SNAPSHOTS") == "1":
        SNAPSHOT.write_text(json.dumps(current, indent=2) + "\n")
    assert current == json.loads(SNAPSHOT.read_text())
    assert {"POST /encode", "POST /tokenize", "POST /decode", "POST /reconstruct", "GET /healthz", "GET /readyz",
            "GET /metrics", "GET /info"} <= set(current)
