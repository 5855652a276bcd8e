"""The engine as everything above it sees it: one interface, two implementations.

`Engine` (engine.py) runs the model in this process; the Ray Serve ingress's `RemoteEngine`
(server/startup/ray_serve.py) forwards the same calls to engine replicas. The HTTP edge and the
Experts service are written against this class only, so a method either engine lacks is an error at
construction (an abstract method), not an AttributeError under load. What only a replicated engine
has (which replica took a request, each replica's report) is not here: see `Replicas`.
"""
from __future__ import annotations

import threading
from abc import ABC, abstractmethod
from concurrent.futures import Future
from typing import Callable

import torch

from server.engine.sequence import Sequence


class EngineHandle(ABC):
    """Submit and cancel sequences; register and retire adapters by registration key; read counts.
    `ready` is set once the model is loaded (`load_error` says why it failed instead)."""

    ready: threading.Event
    load_error: BaseException | None

    @abstractmethod
    def start(self, on_fatal: Callable[[BaseException], None] | None = None) -> None:
        """Begin serving; `on_fatal` is called if the engine can no longer serve at all."""

    @abstractmethod
    def stop(self, timeout: float | None = None) -> None:
        """End every request still running (with an error) and stop."""

    @abstractmethod
    def submit(self, seq: Sequence) -> None:
        """Queue a request; QueueFull when the queue is full, EngineStopped while stopping."""

    @abstractmethod
    def cancel(self, seq: Sequence) -> None:
        """The request's client went away: it leaves the batch before the next step."""

    @abstractmethod
    def register_adapter(self, key: str, folder: str, weights=None) -> Future:
        """Make an adapter servable under `key` (weights already read and checked, or read from `folder`)."""

    @abstractmethod
    def retire_adapter(self, key: str) -> Future:
        """No new request will use `key`; its memory and files are freed once running requests are done."""

    @abstractmethod
    def adapters_in_use(self) -> set[str]:
        """Keys of the adapters that requests running or waiting need (a snapshot, safe from any thread)."""

    @abstractmethod
    def adapter_tier(self, key: str) -> str:
        """Where the adapter resides now: device, cpu or disk."""

    @abstractmethod
    def adapter_counts(self) -> dict[str, int]:
        """Adapters per residency tier."""

    @abstractmethod
    def adapter_memory(self) -> tuple[int, int]:
        """(bytes of adapter slots in use, bytes of the slot pool)."""

    @abstractmethod
    def kv_usage(self) -> tuple[int, int]:
        """(KV blocks in use, blocks in the pool)."""

    @abstractmethod
    def kv_block_bytes(self) -> int:
        """Bytes one KV block takes (0 where the cache is not in this process)."""

    @abstractmethod
    def lora_activity(self) -> tuple[list[str], list[str]]:
        """Expert labels with requests running, and with requests waiting."""

    @abstractmethod
    def set_threads(self, count: int) -> Future:
        """The CPU threads serving may use (lowered while a training run has cores)."""

    @property
    @abstractmethod
    def device(self) -> torch.device:
        """Where a request's sampling generator lives."""

    @property
    @abstractmethod
    def num_running(self) -> int: ...

    @property
    @abstractmethod
    def num_waiting(self) -> int: ...

    @property
    @abstractmethod
    def idle(self) -> bool:
        """Nothing running or waiting."""


class Replicas(ABC):
    """What a replicated engine adds (Ray Serve): where each request runs, and what each replica reported."""

    @abstractmethod
    async def placed(self, seq: Sequence) -> str | None:
        """The replica that took `seq`, once it is placed (None if it failed first)."""

    @abstractmethod
    def replicas(self) -> dict[str, dict]:
        """Replica id -> its last report (running, waiting, experts held, cancelled)."""
