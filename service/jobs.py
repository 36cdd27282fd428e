"""Asynchronous jobs for work longer than a request: records in an embedded SQLite database,
inputs and results as files beside it (ATOKEN_JOBS_DIR), progress per tile, cancellation at
the next tile boundary, expiry after ATOKEN_JOB_TTL_S, and a disk cap (ATOKEN_JOBS_MAX_BYTES)
that refuses new jobs (507) rather than deleting a live result.

A finished result survives a restart; a job that was queued or running when the service
stopped reads `failed` afterwards, with an error saying so: never lost, never stuck."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import os
import secrets
import shutil
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Awaitable, Callable

from .errors import JobNotFound, Overloaded, StorageFull, error_body
from .responses import render_json
from .uploads import SPILL_BYTES, DiskUpload

log = logging.getLogger("atoken.jobs")

OPS = ("encode", "tokenize", "reconstruct")
STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
RESTARTED = "the service restarted while this job was {status}; submit it again"

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    op TEXT NOT NULL,
    status TEXT NOT NULL,
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    expires REAL NOT NULL,
    done INTEGER NOT NULL DEFAULT 0,
    total INTEGER NOT NULL DEFAULT 0,
    unit TEXT NOT NULL DEFAULT 'tiles',
    eta_s REAL,
    request TEXT NOT NULL,          -- options, form fields, Accept: what the route would have seen
    inputs INTEGER NOT NULL,        -- number of input files
    input_bytes INTEGER NOT NULL,
    result_bytes INTEGER NOT NULL DEFAULT 0,
    media_type TEXT,
    headers TEXT,
    error TEXT,                     -- {"status", "body"}: the synchronous route's error answer
    expired INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""


def _write_private(path: Path, data: bytes) -> None:
    """As the spooled files are (mkstemp: 0600); write_bytes follows the umask, 0644 by default."""
    with os.fdopen(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600), "wb") as f:
        f.write(data)


def owner_of(key: str | None) -> str:
    """Jobs belong to the API key that made them (a hash; the key itself is never stored)."""
    return hashlib.sha256(key.encode()).hexdigest()[:32] if key else ""


@dataclass
class JobsConfig:
    directory: Path
    ttl_s: float = 86400.0
    max_bytes: int = 2 * 2**30
    concurrency: int = 1
    max_queued: int = 64


class JobStore:
    """The records (SQLite, one connection guarded by a lock) and the files beside them."""

    def __init__(self, config: JobsConfig):
        self.config = config
        self.dir = Path(config.directory)
        # Clients' uploads and results are theirs: readable by this service's user only. A
        # directory that exists already keeps its mode (a volume shared on purpose).
        self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._lock = threading.Lock()
        # Held from reading the bytes used to writing the new files, so that two jobs admitted
        # or finishing at once cannot both fit in the same free space.
        self._space = threading.Lock()
        self._db = sqlite3.connect(self.dir / "jobs.sqlite3", check_same_thread=False, isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _exec(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # files
    def input_path(self, job_id: str, k: int) -> Path:
        return self.dir / f"{job_id}.in{k}"

    def result_path(self, job_id: str) -> Path:
        return self.dir / f"{job_id}.result"

    def _remove_files(self, job_id: str) -> None:
        for path in self.dir.glob(f"{job_id}.*"):
            path.unlink(missing_ok=True)

    # records
    def used_bytes(self) -> int:
        row = self._exec("SELECT COALESCE(SUM(input_bytes + result_bytes), 0) AS n FROM jobs WHERE expired = 0")
        return int(row[0]["n"])

    def create(self, owner: str, op: str, uploads: list[bytes], request: dict, total: int = 1,
               unit: str = "items") -> dict:
        size = sum(len(u) for u in uploads)
        with self._space:
            self._check_space(size, f"this job's {size} bytes do not fit (finished results expire, or fetch "
                                    "and DELETE them)")
            queued = self._exec("SELECT COUNT(*) AS n FROM jobs WHERE status IN ('queued', 'running')")[0]["n"]
            if queued >= self.config.max_queued:
                raise Overloaded(f"{queued} jobs queued or running", limit=self.config.max_queued, retry_after=30)
            job_id = secrets.token_urlsafe(12)
            for k, data in enumerate(uploads):
                if isinstance(data, DiskUpload):
                    shutil.move(data.path, self.input_path(job_id, k))  # on disk already: no copy in memory
                else:
                    _write_private(self.input_path(job_id, k), data)
            now = time.time()
            self._exec("INSERT INTO jobs (id, owner, op, status, created, expires, request, inputs, input_bytes, "
                       "total, unit) VALUES (?, ?, ?, 'queued', ?, ?, ?, ?, ?, ?, ?)",
                       (job_id, owner, op, now, now + self.config.ttl_s, json.dumps(request), len(uploads), size,
                        total, unit))
        return self.get(job_id, owner)

    def get(self, job_id: str, owner: str) -> dict:
        rows = self._exec("SELECT * FROM jobs WHERE id = ? AND owner = ?", (job_id, owner))
        if not rows:  # another key's job reads as missing: its existence is not revealed
            raise JobNotFound(f"no job {job_id!r}")
        return dict(rows[0])

    def load_inputs(self, job: dict) -> list:
        """Small inputs as bytes; large ones stay files (the store deletes them, not the reader)."""
        out = []
        for k in range(job["inputs"]):
            path = self.input_path(job["id"], k)
            size = path.stat().st_size
            out.append(DiskUpload(str(path), size, owned=False) if size > SPILL_BYTES else path.read_bytes())
        return out

    def set_running(self, job_id: str, total: int, unit: str) -> None:
        self._exec("UPDATE jobs SET status = 'running', started = ?, total = ?, unit = ? WHERE id = ?",
                   (time.time(), total, unit, job_id))

    def set_progress(self, job_id: str, done: int, total: int, eta_s: float | None) -> None:
        self._exec("UPDATE jobs SET done = ?, total = ?, eta_s = ? WHERE id = ?", (done, total, eta_s, job_id))

    def succeed(self, job_id: str, source: str | None, body: bytes | None, media_type: str, headers: dict) -> None:
        """Keeps the result, if it fits under the cap beside what is stored (its inputs are
        dropped first: they are done with); else the job fails with 507 and nothing is kept."""
        self._drop_inputs(job_id)
        size = os.path.getsize(source) if source is not None else len(body or b"")
        target = self.result_path(job_id)
        with self._space:
            try:
                self._check_space(size, f"this job's result of {size} bytes does not fit, so it was not kept")
            except StorageFull:
                if source is not None:
                    os.unlink(source)
                raise
            if source is not None:
                shutil.move(source, target)
            else:
                _write_private(target, body or b"")
            now = time.time()
            self._exec("UPDATE jobs SET status = 'succeeded', finished = ?, expires = ?, result_bytes = ?, "
                       "media_type = ?, headers = ?, eta_s = 0, done = total WHERE id = ?",
                       (now, now + self.config.ttl_s, size, media_type, json.dumps(headers), job_id))

    def _check_space(self, size: int, what: str) -> None:
        used, cap = self.used_bytes(), self.config.max_bytes
        if used + size > cap:
            raise StorageFull(f"the jobs storage holds {used} of {cap} bytes; {what}", limit=cap)

    def fail(self, job_id: str, exc: BaseException) -> None:
        status, body, _ = error_body(exc) if isinstance(exc, Exception) else (500, {"error": {
            "code": "internal_error", "message": str(exc)}}, {})
        self._finish(job_id, "failed", {"status": status, "body": body})

    def cancel(self, job_id: str) -> None:
        self._finish(job_id, "cancelled", None)
        self._remove_files(job_id)

    def _finish(self, job_id: str, status: str, error: dict | None) -> None:
        now = time.time()
        self._exec("UPDATE jobs SET status = ?, finished = ?, expires = ?, error = ?, eta_s = NULL WHERE id = ?",
                   (status, now, now + self.config.ttl_s, json.dumps(error) if error else None, job_id))
        self._drop_inputs(job_id)

    def _drop_inputs(self, job_id: str) -> None:
        for path in self.dir.glob(f"{job_id}.in*"):
            path.unlink(missing_ok=True)
        self._exec("UPDATE jobs SET input_bytes = 0 WHERE id = ?", (job_id,))

    def delete(self, job_id: str) -> None:
        self._remove_files(job_id)
        self._exec("DELETE FROM jobs WHERE id = ?", (job_id,))

    def recover(self) -> int:
        """After a restart: nothing can still be running. Say so on each such job."""
        rows = self._exec("SELECT id, status FROM jobs WHERE status IN ('queued', 'running')")
        for row in rows:
            error = {"status": 503, "body": {"error": {"code": "interrupted",
                                                       "message": RESTARTED.format(status=row["status"])}}}
            self._finish(row["id"], "failed", error)
        return len(rows)

    def expire(self, now: float | None = None) -> int:
        """Finished jobs past their TTL lose their files (410 from then on); records of expired
        jobs are dropped after a second TTL."""
        now = now or time.time()
        rows = self._exec("SELECT id FROM jobs WHERE expired = 0 AND expires <= ? AND status NOT IN "
                          "('queued', 'running')", (now,))
        for row in rows:
            self._remove_files(row["id"])
            self._exec("UPDATE jobs SET expired = 1, result_bytes = 0, input_bytes = 0 WHERE id = ?", (row["id"],))
        self._exec("DELETE FROM jobs WHERE expired = 1 AND expires <= ?", (now - self.config.ttl_s,))
        return len(rows)

    def counts(self) -> dict[str, int]:
        rows = self._exec("SELECT status, COUNT(*) AS n FROM jobs WHERE expired = 0 GROUP BY status")
        return {s: 0 for s in STATUSES} | {r["status"]: r["n"] for r in rows}


def describe(job: dict, base: str = "") -> dict:
    """A job record as the API shows it."""
    error = json.loads(job["error"])["body"]["error"] if job.get("error") else None
    return {
        "id": job["id"], "op": job["op"], "status": job["status"],
        "progress": {"done": job["done"], "total": job["total"], "unit": job["unit"]},
        "eta_s": None if job["eta_s"] is None else round(job["eta_s"], 1),
        "created": _iso(job["created"]), "started": _iso(job["started"]), "finished": _iso(job["finished"]),
        "expires": _iso(job["expires"]), "expired": bool(job["expired"]), "error": error,
        "links": {"self": f"{base}/jobs/{job['id']}", "result": f"{base}/jobs/{job['id']}/result"},
    }


def _iso(t: float | None) -> str | None:
    return None if t is None else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


Execute = Callable[[dict, list[bytes], "asyncio.Event", Callable[[int, int, float | None], None]], Awaitable]


class JobRunner:
    """Runs queued jobs, `concurrency` at a time, through `execute` (the same operations as the
    synchronous routes); keeps a cancel event per running job and sweeps expired results."""

    def __init__(self, store: JobStore, execute: Execute, on_tile: Callable[[], None] | None = None):
        self.store, self.execute = store, execute
        self.cancels: dict[str, asyncio.Event] = {}
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task] = []
        self.on_tile = on_tile

    def start(self) -> None:
        interrupted = self.store.recover()
        if interrupted:
            log.warning("%d jobs were interrupted by the last shutdown; they read 'failed'", interrupted)
        self._tasks = [asyncio.ensure_future(self._worker()) for _ in range(self.store.config.concurrency)]
        self._tasks.append(asyncio.ensure_future(self._sweeper()))

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self.store.recover()  # what was cut short reads 'failed', now rather than at the next start

    def submitted(self) -> None:
        self._wake.set()

    def cancel(self, job_id: str) -> bool:
        event = self.cancels.get(job_id)
        if event is not None:
            event.set()
            return True
        return False

    def _claim(self) -> dict | None:
        rows = self.store._exec("SELECT * FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1")
        if not rows:
            return None
        job = dict(rows[0])
        self.store.set_running(job["id"], job["total"], job["unit"])
        return job

    async def _worker(self) -> None:
        while True:
            job = self._claim()
            if job is None:
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), 1.0)
                except TimeoutError:
                    pass
                continue
            await self._run(job)

    async def _run(self, job: dict) -> None:
        cancel = self.cancels[job["id"]] = asyncio.Event()
        job_id = job["id"]

        def progress(done: int, total: int, eta: float | None) -> None:
            self.store.set_progress(job_id, done, total, eta)
            if self.on_tile and done:
                self.on_tile()

        try:
            inputs = await asyncio.get_running_loop().run_in_executor(None, self.store.load_inputs, job)
            answer = await self.execute(job, inputs, cancel, progress)
            if cancel.is_set():
                raise asyncio.CancelledError
            await asyncio.get_running_loop().run_in_executor(
                None, self.store.succeed, job_id, answer.path, _body_of(answer), answer.media_type, answer.headers)
        except asyncio.CancelledError:
            if not cancel.is_set():
                raise  # the service is stopping: recover() marks the job
            self.store.cancel(job_id)
        except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job
            if cancel.is_set():
                self.store.cancel(job_id)
            else:
                self.store.fail(job_id, exc)
        finally:
            self.cancels.pop(job_id, None)

    async def _sweeper(self) -> None:
        while True:
            await asyncio.sleep(min(60.0, max(1.0, self.store.config.ttl_s / 10)))
            self.store.expire()


def _body_of(answer) -> bytes | None:
    if answer.path is not None:
        return None
    if answer.json is not None:
        return render_json(answer.json)
    return answer.body
