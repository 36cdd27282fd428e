"""Inputs of a dataset run, in a fixed order: a folder (recursive; .tar files in it expand into
their members), a text file listing paths, or WebDataset-style .tar shards. Bytes are read only
when an input is processed, and an input larger than the upload limit is refused from its size."""

from __future__ import annotations

import tarfile
from dataclasses import dataclass
from pathlib import Path

from ..uploads import SPILL_BYTES, DiskUpload

# WebDataset keeps labels and captions beside each sample; they are not media.
SIDECARS = {".json", ".txt", ".cls", ".csv", ".md", ".yaml", ".yml"}


@dataclass(frozen=True)
class Entry:
    key: str  # path relative to SRC, or "<shard.tar>/<member>"
    path: str  # the file, or the tar holding the member
    member: str | None = None
    size: int = 0

    def read(self):
        """Bytes, or for a large plain file the file itself (a video is then decoded from disk)."""
        if self.member is None:
            if self.size > SPILL_BYTES:
                return DiskUpload(self.path, self.size, owned=False)
            return Path(self.path).read_bytes()
        with tarfile.open(self.path) as tar:
            handle = tar.extractfile(self.member)
            if handle is None:
                raise FileNotFoundError(f"{self.member} is not a file in {self.path}")
            return handle.read()


def list_inputs(src: str | Path) -> list[Entry]:
    src = Path(src)
    if src.is_dir():
        entries = []
        for path in sorted(p for p in src.rglob("*") if p.is_file() and not p.name.startswith(".")):
            key = path.relative_to(src).as_posix()
            entries += _tar_members(path, key) if path.suffix == ".tar" else [Entry(key, str(path), None,
                                                                                   path.stat().st_size)]
        return entries
    if src.suffix == ".tar":
        return _tar_members(src, src.name)
    if src.is_file():  # a list of paths, one per line, relative to the list's folder
        lines = [ln.strip() for ln in src.read_text().splitlines() if ln.strip() and not ln.startswith("#")]
        out = []
        for line in lines:
            path = (src.parent / line) if not Path(line).is_absolute() else Path(line)
            out.append(Entry(line, str(path), None, path.stat().st_size if path.exists() else 0))
        return out
    raise FileNotFoundError(f"{src}: not a folder, a .tar shard or a list of paths")


def _tar_members(path: Path, key: str) -> list[Entry]:
    with tarfile.open(path) as tar:
        members = [m for m in tar.getmembers() if m.isfile() and Path(m.name).suffix.lower() not in SIDECARS]
    return [Entry(f"{key}/{m.name}", str(path), m.name, m.size) for m in sorted(members, key=lambda m: m.name)]
