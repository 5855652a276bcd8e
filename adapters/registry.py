"""The experts the server knows about: metadata only (weights live in the engine's LoraBank)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field


@dataclass(frozen=True)
class AdapterRecord:
    name: str
    path: str
    rank: int
    target_modules: tuple[str, ...]
    nbytes: int
    description: str = ""
    examples: tuple[str, ...] = ()
    stop: tuple[str, ...] = field(default_factory=tuple)
    stop_token_ids: frozenset[int] = frozenset()


class AdapterRegistry:
    """Read from the HTTP threads, written when adapters are added or retired."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._records: dict[str, AdapterRecord] = {}

    def add(self, record: AdapterRecord) -> None:
        with self._lock:
            self._records[record.name] = record

    def remove(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.pop(name, None)

    def get(self, name: str) -> AdapterRecord | None:
        with self._lock:
            return self._records.get(name)

    def all(self) -> list[AdapterRecord]:
        with self._lock:
            return list(self._records.values())
