"""Everything the HTTP side shares: settings, the engine, the registry, the store, the base's facts."""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from server.bootstrap import BaseInfo, build_runtime
from server.engine import Engine
from server.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    registry: AdapterRegistry
    store: AdapterStore
    engine: Engine
    base: BaseInfo | None = None  # set once the engine thread has loaded the model
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def ready(self) -> bool:
        return self.base is not None and self.engine.ready.is_set()


def create_state(settings: Settings) -> ServerState:
    registry = AdapterRegistry()
    store = AdapterStore(settings.data_dir)
    state: ServerState

    def set_base(info: BaseInfo) -> None:
        state.base = info

    def delete_retired(key: str, folder: str) -> None:
        # off the engine thread: file removal is no work for the thread that owns the model
        threading.Thread(target=store.delete_files, args=(folder,), daemon=True).start()

    engine = Engine(
        load_runner=lambda: build_runtime(settings, registry, store, set_base, engine.wake, delete_retired),
        max_batch_size=settings.max_batch_size,
        max_queued=settings.max_queued_requests,
    )
    state = ServerState(settings=settings, registry=registry, store=store, engine=engine)
    return state
