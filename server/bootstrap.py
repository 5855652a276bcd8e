"""Start-up on the engine thread: load the base, build the runner, load the configured experts."""
from __future__ import annotations

import logging
from dataclasses import dataclass

from adapters.lora import AdapterError, BaseShape, load_lora
from adapters.registry import AdapterRecord, AdapterRegistry
from server.chat import base_stop_token_ids
from server.model_loader import LoadedBase, load_base
from server.model_runner import ModelRunner
from server.settings import ConfigError, Settings

log = logging.getLogger("loraplex.bootstrap")


@dataclass(frozen=True)
class BaseInfo:
    """What the HTTP side needs to know about the loaded base."""

    name: str
    tokenizer: object  # the HTTP side's own tokenizer instance (not shared with the engine)
    stop_token_ids: frozenset[int]
    context_window: int
    vocab_size: int
    shape: BaseShape


def context_window_for(settings: Settings, model_config) -> int:
    limit = getattr(model_config, "max_position_embeddings", None) or settings.context_window
    return min(settings.context_window, limit)


def load_adapter_into(runner: ModelRunner, registry: AdapterRegistry, name: str, spec, shape: BaseShape) -> None:
    bad_ids = [i for i in spec.stop_token_ids if not 0 <= i < runner.vocab_size]
    if bad_ids:
        raise AdapterError(f"stop_token_ids {bad_ids} are outside the vocabulary (0..{runner.vocab_size - 1})")
    weights = load_lora(spec.path, shape)
    runner.lora.add(name, weights)
    registry.add(
        AdapterRecord(
            name=name,
            path=str(spec.path),
            rank=weights.rank,
            target_modules=weights.target_modules,
            nbytes=weights.nbytes,
            description=spec.description,
            examples=tuple(spec.examples),
            stop=tuple(spec.stop),
            stop_token_ids=frozenset(spec.stop_token_ids),
        )
    )


def build_runner(settings: Settings, registry: AdapterRegistry, on_base_ready) -> ModelRunner:
    base: LoadedBase = load_base(settings)
    config = base.model.config
    context_window = context_window_for(settings, config)
    runner = ModelRunner(base.model, base.tokenizer, settings.max_batch_size, context_window)
    shape = BaseShape.from_config(config)
    for name, spec in settings.adapters.items():
        try:
            load_adapter_into(runner, registry, name, spec, shape)
        except AdapterError as exc:
            raise ConfigError(f"adapter '{name}' from {spec.path}: {exc}") from exc
        log.info("loaded adapter %s from %s", name, spec.path)
    from transformers import AutoTokenizer

    http_tokenizer = AutoTokenizer.from_pretrained(base.folder)
    on_base_ready(
        BaseInfo(
            name=base.name,
            tokenizer=http_tokenizer,
            stop_token_ids=base_stop_token_ids(base.tokenizer, getattr(base.model, "generation_config", None)),
            context_window=context_window,
            vocab_size=config.vocab_size,
            shape=shape,
        )
    )
    return runner
