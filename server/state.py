"""Everything the HTTP side shares: settings, the engine, the registry, and the loaded base's facts."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from adapters.registry import AdapterRegistry
from server.bootstrap import BaseInfo, build_runner
from server.engine import Engine
from server.settings import Settings


@dataclass
class ServerState:
    settings: Settings
    registry: AdapterRegistry
    engine: Engine
    base: BaseInfo | None = None  # set once the engine thread has loaded the model
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))

    @property
    def ready(self) -> bool:
        return self.base is not None and self.engine.ready.is_set()


def create_state(settings: Settings) -> ServerState:
    registry = AdapterRegistry()
    state: ServerState

    def set_base(info: BaseInfo) -> None:
        state.base = info

    engine = Engine(
        load_runner=lambda: build_runner(settings, registry, set_base),
        max_batch_size=settings.max_batch_size,
        max_queued=settings.max_queued_requests,
    )
    state = ServerState(settings=settings, registry=registry, engine=engine)
    return state
