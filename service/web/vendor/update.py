"""Refresh the vendored JavaScript from the pinned npm packages (`make vendor-js`).

npm installs exactly what package-lock.json pins (with its integrity hashes) into a scratch
folder; the built files named in VENDORED.json are copied here and their sha256 recorded, which
tests/service/test_web.py checks against the files in the repository."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
RECORD = HERE / "VENDORED.json"


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> int:
    record = json.loads(RECORD.read_text())
    lock = json.loads((HERE / "package-lock.json").read_text())
    with tempfile.TemporaryDirectory() as scratch:
        for name in ("package.json", "package-lock.json"):
            shutil.copy(HERE / name, scratch)
        subprocess.run(["npm", "ci", "--ignore-scripts", "--no-audit", "--no-fund"], cwd=scratch, check=True)
        for package, entry in record.items():
            pinned = lock["packages"][f"node_modules/{package}"]
            source = Path(scratch) / "node_modules" / package
            entry.update(version=pinned["version"], integrity=pinned["integrity"],
                         license=pinned.get("license", entry.get("license")))
            for target, origin in entry["files"].items():
                (HERE / target).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source / origin, HERE / target)
                entry["sha256"][target] = sha256(HERE / target)
    RECORD.write_text(json.dumps(record, indent=2) + "\n")
    pins = ", ".join(f"{package}@{entry['version']}" for package, entry in record.items())
    print(f"vendored: {pins}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
