"""Everything the HTTP side shares: settings, the engine, the registry, the store, the base's facts.

Built by server/startup/bootstrap.py; the HTTP edge only reads it.
"""
from __future__ import annotations

import asyncio
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from adapters.lora import BaseShape
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from router.resolve import ExpertRouter
from server.api.errors import APIError
from server.api.logprobs import TokenPieces
from server.api.prompts import PromptEncoder
from server.api.structured import OutputFormats
from server.engine.interface import EngineHandle, Replicas
from server.experts.service import Experts
from server.jobs.batch_store import BatchStore
from server.jobs.response_store import ResponseStore
from server.jobs.service import FineTuning
from server.jobs.store import FileStore
from server.metrics import Metrics
from server.settings import Settings
from server.tenants.limits import TenantLimiter
from server.tenants.principal import Principal
from server.tenants.store import Limits, TenantStore


@dataclass(frozen=True)
class BaseInfo:
    """What the HTTP side needs to know about the loaded base."""

    name: str
    names: frozenset[str]  # names an adapter's base_model_name_or_path may use for this base
    tokenizer: object  # the HTTP side's own tokenizer instance (not shared with the engine)
    prompts: PromptEncoder  # over that tokenizer: chat template rendering and raw prompt encoding
    pieces: TokenPieces  # over that tokenizer: token ids -> text and bytes for logprobs
    stop_token_ids: frozenset[int]
    context_window: int
    vocab_size: int
    shape: BaseShape
    formats: OutputFormats  # response_format / tools -> grammars over the same tokenizer


@dataclass
class ServerState:
    settings: Settings
    registry: AdapterRegistry
    store: AdapterStore
    engine: EngineHandle
    metrics: Metrics
    experts: Experts  # every change to the registry goes through it
    router: ExpertRouter | None = None  # set with `base`
    base: BaseInfo | None = None  # set once the engine thread has loaded the model
    replicas: Replicas | None = None  # Ray Serve: where each request runs (None: the engine is this process's)
    draining: bool = False
    started_at: int = field(default_factory=lambda: int(time.time()))
    # loads the router's encoders and indexes the experts; joined before the process exits, since a
    # thread still inside torch or tokenizers when the interpreter tears down aborts the process
    router_thread: threading.Thread | None = None
    jobs: FineTuning | None = None  # fine-tuning jobs; set with `base` (fine_tuning: true)
    tenants: TenantStore | None = None  # tenants, keys and usage (tenants: true); None: no tenants
    limiter: TenantLimiter = field(default_factory=TenantLimiter)  # tenants' rate and concurrency limits
    tracer_provider: object | None = None  # FastAPI's request spans go here (None: the global provider)
    files: FileStore | None = None  # uploaded files (training and batch input) and batch results
    responses: ResponseStore | None = None  # stored Responses (store: true)
    batches: BatchStore | None = None  # batches and their results so far
    # Tokenizing and routing run here, off the event loop, in fewer threads than there are cores:
    # a burst of megabyte prompts then cannot take every core from the event loop and the engine.
    text_pool: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(
        max(1, (os.cpu_count() or 2) - 1), thread_name_prefix="loraplex-text"))

    @property
    def ready(self) -> bool:
        return self.base is not None and self.engine.ready.is_set()

    def require_ready(self) -> None:
        """503 (with Retry-After) until the model and the experts are loaded."""
        if not self.ready:
            raise APIError(503, "The model is still loading; retry shortly.", code="loading",
                           headers={"Retry-After": "2"})

    def limits_of(self, principal: Principal) -> Limits | None:
        """A tenant's limits (read now: an admin's change applies at once); None for anyone else."""
        if principal.tenant is None or self.tenants is None:
            return None
        tenant = self.tenants.get_tenant(principal.tenant)
        return tenant.limits if tenant is not None else None

    async def in_text_pool(self, fn, *args):
        """fn(*args) in the text pool (tokenizing, template rendering, routing), awaited."""
        return await asyncio.get_running_loop().run_in_executor(self.text_pool, fn, *args)
