"""Uploaded files and fine-tuning jobs on disk, under the data dir; they survive restarts.

Layout:
- `<data_dir>/files/<file id>.jsonl` (the bytes) and `<file id>.json` (the OpenAI file object);
- `<data_dir>/jobs/<job id>/job.json` (the OpenAI job object plus the training plan),
  `events.jsonl` (appended, one event a line), `train/` (the run's output folder: checkpoint,
  then the adapter), `worker.log`.

Every JSON document is written beside the old one and renamed over it, so a crash leaves the old
or the new version, never half of one; a file's bytes are written before its object, so a listed
file always has its content.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import tempfile
import threading
import time
from pathlib import Path


INCOMING_PREFIX = ".incoming-"


def write_json_atomic(path: Path, value) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as handle:
            json.dump(value, handle, indent=1)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_json(path: Path) -> dict | None:
    """The document, or None when it is missing or unreadable (a stray file is skipped, not fatal)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def new_id(prefix: str) -> str:
    """24 hex digits like OpenAI's, the first 14 the creation time in microseconds: ids sort in creation
    order, so jobs created within the same second (`created_at` has whole seconds) still queue, list and
    resume after a restart in the order they were submitted. The last 10 are random."""
    return f"{prefix}-{time.time_ns() // 1000:014x}{secrets.token_hex(5)}"


class FileStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self.collect_incoming()

    def content_path(self, file_id: str) -> Path:
        return self.root / f"{file_id}.jsonl"

    def incoming(self) -> Path:
        """A new path to write an upload to before it is checked: not a file of the store until
        create() takes it (an interrupted upload's leftover is removed at the next start)."""
        return self.root / f"{INCOMING_PREFIX}{secrets.token_hex(8)}"

    def collect_incoming(self) -> int:
        """Remove uploads a crash left half-written or unchecked; how many."""
        leftovers = list(self.root.glob(f"{INCOMING_PREFIX}*"))
        for path in leftovers:
            path.unlink(missing_ok=True)
        return len(leftovers)

    def create(self, filename: str, purpose: str, incoming: Path, owner: str = "") -> dict:
        """Store the checked upload at `incoming` (from incoming()) as a new file object of `owner` (a tenant;
        "" without tenants), kept as `_owner` (the edge shows no field starting with '_')."""
        file_id = new_id("file")
        path = self.content_path(file_id)
        with open(incoming, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(incoming, path)
        record = {"id": file_id, "object": "file", "bytes": path.stat().st_size, "created_at": int(time.time()),
                  "filename": filename, "purpose": purpose, "status": "processed", "status_details": None,
                  "_owner": owner}
        write_json_atomic(self.root / f"{file_id}.json", record)
        return record

    def get(self, file_id: str) -> dict | None:
        if not file_id.startswith("file-") or "/" in file_id:
            return None
        return read_json(self.root / f"{file_id}.json")

    def list(self) -> list[dict]:
        records = [r for r in map(read_json, self.root.glob("file-*.json")) if r is not None]
        return sorted(records, key=lambda r: (r["created_at"], r["id"]), reverse=True)

    def delete(self, file_id: str) -> bool:
        with self._lock:
            meta = self.root / f"{file_id}.json"
            if self.get(file_id) is None:
                return False
            meta.unlink()  # unlisted first: a crash leaves orphan bytes, never a listed file without them
            self.content_path(file_id).unlink(missing_ok=True)
            return True


class JobStore:
    """Jobs as folders. A job's JSON is rewritten by one writer at a time (the lock)."""

    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    def create(self, job: dict) -> dict:
        folder = self.folder(job["id"])
        folder.mkdir(exist_ok=True)  # the caller may have put the job's files there first
        write_json_atomic(folder / "job.json", job)
        return job

    def get(self, job_id: str) -> dict | None:
        if not job_id.startswith("ftjob-") or "/" in job_id:
            return None
        return read_json(self.folder(job_id) / "job.json")

    def list(self) -> list[dict]:
        jobs = [job for job in (self.get(p.name) for p in self.root.glob("ftjob-*")) if job is not None]
        return sorted(jobs, key=lambda j: (j["created_at"], j["id"]), reverse=True)

    def update(self, job_id: str, **fields) -> dict:
        with self._lock:
            job = self.get(job_id)
            job.update(fields)
            write_json_atomic(self.folder(job_id) / "job.json", job)
            return job

    def add_event(self, job_id: str, message: str, level: str = "info", data: dict | None = None) -> dict:
        event = {"object": "fine_tuning.job.event", "id": new_id("ftevent"), "created_at": int(time.time()),
                 "level": level, "message": message, "type": "metrics" if data else "message", "data": data}
        with self._lock, open(self.folder(job_id) / "events.jsonl", "a") as handle:
            handle.write(json.dumps(event) + "\n")
        return event

    def events(self, job_id: str) -> list[dict]:
        """Oldest first. A half-written last line (a crash mid-append) is skipped."""
        path = self.folder(job_id) / "events.jsonl"
        if not path.exists():
            return []
        events = []
        for line in path.read_text().splitlines():
            try:
                events.append(json.loads(line))
            except ValueError:
                continue
        return events

    def remove_output(self, job_id: str) -> None:
        shutil.rmtree(self.folder(job_id) / "train", ignore_errors=True)
