"""Batches on disk, under `<data_dir>/batches/<batch id>/`; they survive restarts.

- `batch.json`: the OpenAI batch object (rewritten atomically, store.write_json_atomic);
- `input.jsonl`: a copy of the input file taken at creation (deleting the file never breaks the batch);
- `output.jsonl`, `errors.jsonl`: one line per answered request, appended as each finishes, in OpenAI's
  batch output format. Each line's `id` carries its input line number, so after a restart the lines
  already answered are read back from these two files and skipped: no line is answered twice and none
  is lost. A line half-written by a crash is cut off before the batch goes on.
"""
from __future__ import annotations

import json
import shutil
import threading
from pathlib import Path

from server.jobs.store import new_id, read_json, write_json_atomic

ACTIVE = ("validating", "in_progress", "finalizing", "cancelling")
_LINE_ID = "batch_req_"


def line_id(batch_id: str, line: int) -> str:
    """The output line's id: its input line number (8 hex digits), then the batch's own digits."""
    return f"{_LINE_ID}{line:08x}{batch_id.removeprefix('batch_')}"


def line_of(request_id: str) -> int | None:
    try:
        return int(request_id[len(_LINE_ID):len(_LINE_ID) + 8], 16)
    except (TypeError, ValueError):
        return None


def batch_file_problems(path: Path, max_lines: int) -> list[str]:
    """Why an uploaded batch input file cannot be a batch (not UTF-8, no request, too many); [] if it can.
    A line that is not a valid request is not a problem here: it becomes an error-file line when the
    batch runs, as OpenAI reports per-request failures."""
    lines = 0
    with open(path, "rb") as handle:
        for number, raw in enumerate(handle, 1):
            try:
                text = raw.decode("utf-8")
            except UnicodeDecodeError:
                return [f"line {number}: not UTF-8 text"]
            lines += bool(text.strip())
    if lines == 0:
        return ["the file holds no request lines"]
    if lines > max_lines:
        return [f"the file has {lines} requests, over this server's limit of {max_lines} per batch (max_batch_lines)"]
    return []


def request_lines(path: Path) -> list[tuple[int, str]]:
    """(line number from 0, text) of every non-blank line."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return [(number, text) for number, text in enumerate(handle) if text.strip()]


class BatchStore:
    def __init__(self, root: Path):
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()

    def folder(self, batch_id: str) -> Path:
        return self.root / batch_id

    def new_id(self) -> str:
        return new_id("batch").replace("-", "_", 1)

    def create(self, batch: dict, input_path: Path) -> dict:
        folder = self.folder(batch["id"])
        folder.mkdir()
        shutil.copyfile(input_path, folder / "input.jsonl")
        write_json_atomic(folder / "batch.json", batch)
        return batch

    def get(self, batch_id: str) -> dict | None:
        if not batch_id.startswith("batch_") or "/" in batch_id:
            return None
        return read_json(self.folder(batch_id) / "batch.json")

    def list(self) -> list[dict]:
        batches = [b for b in (self.get(p.name) for p in self.root.glob("batch_*")) if b is not None]
        return sorted(batches, key=lambda b: (b["created_at"], b["id"]), reverse=True)

    def update(self, batch_id: str, **fields) -> dict:
        with self._lock:
            batch = self.get(batch_id)
            batch.update(fields)
            write_json_atomic(self.folder(batch_id) / "batch.json", batch)
            return batch

    def answered(self, batch_id: str) -> tuple[set[int], int, int]:
        """(input line numbers answered, output lines, error lines), read from the result files; a last line a
        crash left half-written is cut off first."""
        done: set[int] = set()
        counts = []
        for name in ("output.jsonl", "errors.jsonl"):
            path = self.folder(batch_id) / name
            count = 0
            if path.exists():
                data = path.read_bytes()
                whole = data[:data.rfind(b"\n") + 1]
                if len(whole) != len(data):
                    with open(path, "r+b") as handle:
                        handle.truncate(len(whole))
                for line in whole.splitlines():
                    try:
                        number = line_of(json.loads(line)["id"])
                    except (ValueError, KeyError, TypeError):
                        continue
                    if number is not None and number not in done:
                        done.add(number)
                        count += 1
            counts.append(count)
        return done, counts[0], counts[1]
