"""Start-up on the engine thread: load the base, build the runner, bring back the experts.

Experts come from two places and pass the same checks: the config's `adapters` (read in
place) and the managed store's manifest (registered over HTTP before a restart).
"""
from __future__ import annotations

import logging
import uuid
from dataclasses import dataclass
from pathlib import Path

from adapters.admission import AdmissionError, check_new_name, check_stop_token_ids, fill_from_folder, validate_staged
from adapters.lora import BaseShape
from adapters.registry import AdapterRecord, AdapterRegistry
from adapters.store import AdapterStore
from adapters.text import find_unencodable, unencodable_message
from router.resolve import AUTO_MODEL
from server.chat import PromptEncoder, base_stop_token_ids
from server.model_loader import LoadedBase, load_base
from server.metrics import Metrics
from server.model_runner import ModelRunner
from server.residency import AdapterCache
from server.settings import ConfigError, Settings

log = logging.getLogger("loraplex.bootstrap")


@dataclass(frozen=True)
class BaseInfo:
    """What the HTTP side needs to know about the loaded base."""

    name: str
    names: frozenset[str]  # names an adapter's base_model_name_or_path may use for this base
    tokenizer: object  # the HTTP side's own tokenizer instance (not shared with the engine)
    prompts: PromptEncoder  # over that tokenizer: chat template rendering and raw prompt encoding
    stop_token_ids: frozenset[int]
    context_window: int
    vocab_size: int
    shape: BaseShape


def context_window_for(settings: Settings, model_config) -> int:
    limit = getattr(model_config, "max_position_embeddings", None) or settings.context_window
    return min(settings.context_window, limit)


def new_key(name: str) -> str:
    return f"{name}-{uuid.uuid4().hex[:12]}"


def record_for(name: str, key: str, folder: str, source: str, weights, spec) -> AdapterRecord:
    """spec: anything with description/examples/stop/stop_token_ids/temperature/top_p/max_tokens."""
    defaults = {k: getattr(spec, k) for k in ("temperature", "top_p", "max_tokens") if getattr(spec, k) is not None}
    return AdapterRecord(
        name=name,
        key=key,
        folder=folder,
        source=source,
        rank=weights.rank,
        target_modules=weights.target_modules,
        nbytes=weights.nbytes,
        description=spec.description,
        examples=tuple(spec.examples),
        stop=tuple(spec.stop),
        stop_token_ids=frozenset(spec.stop_token_ids),
        defaults=defaults,
    )


def _restore_experts(settings: Settings, base: BaseInfo, cache: AdapterCache, registry: AdapterRegistry,
                     store: AdapterStore) -> None:
    for name, spec in settings.adapters.items():
        try:
            spec = fill_from_folder(spec, spec.path)
            check_new_name(name, {base.name, AUTO_MODEL, *settings.auto_model_names})
            check_stop_token_ids(spec.stop_token_ids, base.vocab_size)
            weights = validate_staged(Path(spec.path), base.shape, settings.max_adapter_rank, base.names,
                                      settings.base_mismatch)
        except AdmissionError as exc:
            raise ConfigError(f"adapter '{name}' from {spec.path}: {exc.message}") from exc
        record = record_for(name, new_key(name), spec.path, "config", weights, spec)
        cache.register(record.key, record.folder, weights)
        registry.add(record)
        log.info("loaded adapter %s from %s", name, spec.path)
    orphans = store.collect_garbage()
    if orphans:
        log.warning("removed %d store folders no manifest entry named (an interrupted registration)", len(orphans))
    for name, entry in store.read_manifest().items():
        if name in settings.adapters:
            log.warning("adapter %s is in the config and in the store; serving the config's", name)
            continue
        problem = find_unencodable(entry)
        if problem is not None:  # written by an older version that let such text in: kept on disk, not served
            log.error("manifest entry %s is not served: %s", name, unencodable_message(problem))
            continue
        record = AdapterRecord.from_manifest(entry)
        cache.register(record.key, record.folder)  # read from disk on first use
        registry.add(record)
    log.info("%d experts registered", len(registry.all()))


def build_runtime(settings: Settings, registry: AdapterRegistry, store: AdapterStore, on_base_ready,
                  wake, on_freed, metrics: Metrics) -> tuple[ModelRunner, AdapterCache]:
    loaded: LoadedBase = load_base(settings)
    config = loaded.model.config
    context_window = context_window_for(settings, config)
    runner = ModelRunner(loaded.model, loaded.tokenizer, settings.max_batch_size, context_window)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(loaded.folder)
    base = BaseInfo(
        name=loaded.name,
        names=frozenset({loaded.name, loaded.folder.name}),
        tokenizer=tokenizer,
        prompts=PromptEncoder(tokenizer),
        stop_token_ids=base_stop_token_ids(loaded.tokenizer, getattr(loaded.model, "generation_config", None)),
        context_window=context_window,
        vocab_size=config.vocab_size,
        shape=BaseShape.from_config(config),
    )
    cache = AdapterCache(runner.lora, base.shape, settings.max_gpu_adapters, settings.max_cpu_adapters,
                         wake=wake, on_freed=on_freed, metrics=metrics)
    _restore_experts(settings, base, cache, registry, store)
    on_base_ready(base)
    return runner, cache
