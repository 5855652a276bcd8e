"""Where each expert's weights live: on the compute device, in CPU memory, or only on disk.

Tiers: at most `max_device` adapters in the LoraBank (LRU), at most `max_cpu` more in CPU
memory (LRU); the rest are read from their folder on demand by a background thread, so a
request for a cold adapter waits for its own load while the batch keeps decoding. Only the
engine thread calls the methods; `tier()` may be read from anywhere (a snapshot).
"""
from __future__ import annotations

import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from adapters.lora import BaseShape, LoraWeights, load_lora
from server.engine.lora_batch import LoraBank
from server.metrics import Metrics

log = logging.getLogger("loraplex.residency")


class AdapterUnavailable(Exception):
    pass


class AdapterCache:
    def __init__(self, bank: LoraBank, shape: BaseShape, max_device: int, max_cpu: int,
                 wake: Callable[[], None], on_freed: Callable[[str], None], metrics: Metrics):
        self.metrics = metrics
        self.bank = bank
        self.shape = shape
        self.max_device = max_device
        self.max_cpu = max_cpu
        self._wake = wake  # tells the engine a background load finished
        self._on_freed = on_freed  # called with a retired adapter's folder once nothing uses it any more
        self._folders: dict[str, str] = {}
        self._device: OrderedDict[str, None] = OrderedDict()  # keys in the bank, least recent first
        self._cpu: OrderedDict[str, LoraWeights] = OrderedDict()
        self._loading: dict[str, Future] = {}
        self._retiring: set[str] = set()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="loraplex-adapter-load")

    def register(self, key: str, folder: str, weights: LoraWeights | None = None) -> None:
        """Know an adapter; with `weights` (already read and validated) it starts in CPU memory."""
        self._folders[key] = folder
        if weights is not None:
            self._put_cpu(key, weights)

    def retire(self, key: str) -> None:
        """No new requests will ask for it; free it as soon as running ones are done."""
        self._retiring.add(key)

    def tier(self, key: str) -> str:
        if key in self._device:
            return "device"
        if key in self._cpu:
            return "cpu"
        return "disk"

    def acquire(self, key: str, in_use: set[str]) -> bool:
        """True when `key` is on the device now; else starts what is needed and returns False."""
        if key not in self._folders:
            raise AdapterUnavailable(f"adapter {key} is not registered")
        if key in self._device:
            self._device.move_to_end(key)
            return True
        weights = self._cpu.get(key)
        if weights is None:
            weights = self._finished_load(key)
            if weights is None:
                return False
        if not self._make_room(in_use):
            return False  # every device slot serves a running request: wait for one to finish
        try:
            self.bank.add(key, weights)
        except ValueError as exc:  # what the bank refuses (non-finite weights that bypassed admission)
            raise AdapterUnavailable(f"adapter {key} cannot be served: {exc}") from exc
        self._device[key] = None
        return True

    def release_unused(self, in_use: set[str]) -> None:
        for key in [k for k in self._retiring if k not in in_use]:
            self._retiring.discard(key)
            self.bank.remove(key)
            self._device.pop(key, None)
            self._cpu.pop(key, None)
            self._loading.pop(key, None)
            self._on_freed(self._folders.pop(key))

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- internals ----------------------------------------------------------------------

    def _finished_load(self, key: str) -> LoraWeights | None:
        future = self._loading.get(key)
        if future is None:
            future = self._pool.submit(self._timed_load, self._folders[key])
            future.add_done_callback(lambda _: self._wake())
            self._loading[key] = future
            return None
        if not future.done():
            return None
        del self._loading[key]
        try:
            weights = future.result()
        except Exception as exc:  # the files went bad on disk since registration
            raise AdapterUnavailable(f"adapter {key} failed to load: {exc}") from exc
        self._put_cpu(key, weights)
        return weights

    def _timed_load(self, folder: str) -> LoraWeights:
        with self.metrics.adapter_load_time.time():
            weights = load_lora(folder, self.shape)
        self.metrics.adapter_loads.inc()
        return weights

    def counts(self) -> dict[str, int]:
        """Adapters per tier (a snapshot; read at scrape time)."""
        device = len(self._device)
        cpu = len([k for k in list(self._cpu) if k not in self._device])
        return {"device": device, "cpu": cpu, "disk": max(0, len(self._folders) - device - cpu)}

    def _put_cpu(self, key: str, weights: LoraWeights) -> None:
        self._cpu[key] = weights
        self._cpu.move_to_end(key)
        while len(self._cpu) > self.max_cpu:
            self._cpu.popitem(last=False)  # back to disk only; it reloads on demand

    def _make_room(self, in_use: set[str]) -> bool:
        if len(self._device) < self.max_device:
            return True
        victim = next((k for k in self._device if k not in in_use), None)
        if victim is None:
            return False
        self.bank.remove(victim)
        del self._device[victim]
        self.metrics.adapter_evictions.inc()
        return True
