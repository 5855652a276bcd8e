"""Stored Responses (`store: true`, OpenAI's default), for GET /v1/responses/{id} and previous_response_id.

One JSON document per response under `<data_dir>/responses/`: the response object as the client got it,
the conversation it answered (normalized input items, the chain of earlier responses included) and its
output items, so a later request that names it continues the conversation without its client sending it
again. Bounded: past `max_stored` the oldest are removed (ids sort in creation order, store.new_id), so a
busy server's disk never fills with conversations nobody will continue.
"""
from __future__ import annotations

import secrets
import threading
import time
from pathlib import Path

from server.jobs.store import read_json, write_json_atomic


def new_response_id(prefix: str = "resp") -> str:
    """OpenAI's shape (resp_, msg_, fc_ + hex), the first 14 digits the creation time: ids sort in creation order."""
    return f"{prefix}_{time.time_ns() // 1000:014x}{secrets.token_hex(8)}"


class ResponseStore:
    def __init__(self, root: Path, max_stored: int):
        self.root = root
        self.max_stored = max_stored
        root.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._ids = sorted(path.stem for path in root.glob("resp_*.json"))

    def _path(self, response_id: str) -> Path | None:
        if not response_id.startswith("resp_") or "/" in response_id or len(response_id) > 100:
            return None
        return self.root / f"{response_id}.json"

    def put(self, response_id: str, document: dict) -> None:
        """Keep a response (blocking: call from a thread); the oldest ones go past the bound."""
        if self.max_stored <= 0:
            return
        write_json_atomic(self._path(response_id), document)
        with self._lock:
            self._ids.append(response_id)
            excess, self._ids = self._ids[:-self.max_stored], self._ids[-self.max_stored:]
        for old in excess:
            self._path(old).unlink(missing_ok=True)

    def get(self, response_id: str) -> dict | None:
        path = self._path(response_id)
        return read_json(path) if path is not None else None

    def delete(self, response_id: str) -> bool:
        path = self._path(response_id)
        if path is None or not path.exists():
            return False
        path.unlink(missing_ok=True)
        with self._lock:
            if response_id in self._ids:
                self._ids.remove(response_id)
        return True

    def __len__(self) -> int:
        return len(self._ids)
