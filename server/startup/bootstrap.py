"""Start-up wiring: the server's state, and on the engine thread the base, the runner and the experts.

Experts come from two places and pass the same checks: the config's `adapters` (read in
place) and the managed store's manifest (registered over HTTP before a restart).
"""
from __future__ import annotations

import logging
import threading
from pathlib import Path

from adapters.admission import AdmissionError, check_new_name, check_token_ids, fill_from_folder, validate_staged
from adapters.base_model import BaseModelError, base_stop_token_ids, load_base, resolve_base_folder
from adapters.lora import BaseShape
from adapters.registry import AdapterRecord, AdapterRegistry
from adapters.store import AdapterStore
from adapters.text import find_unencodable, unencodable_message
from router.classifier import ExpertClassifier, ExpertProfile
from router.encoder import RouterEncoder
from router.resolve import AUTO_MODEL, ExpertRouter
from server.api.fine_tuning import register_trained
from server.api.logprobs import TokenPieces
from server.api.prompts import PromptEncoder
from server.api.state import BaseInfo, ServerState
from server.api.schemas import SchemaPolicy
from server.api.structured import OutputFormats
from server.engine.engine import Engine, EngineConfig
from server.engine.model_runner import ModelRunner, kv_block_bytes
from server.engine.lora_batch import LoraBank, choose_kernels
from server.engine.residency import AdapterCache
from server.jobs.service import FineTuning, TrainingDefaults
from server.metrics import Metrics
from server.settings import ConfigError, Settings
from server.startup.kv_budget import plan_kv_blocks

log = logging.getLogger("loraplex.bootstrap")


def context_window_for(settings: Settings, model_config) -> int:
    limit = getattr(model_config, "max_position_embeddings", None) or settings.context_window
    return min(settings.context_window, limit)


def _restore_experts(settings: Settings, base: BaseInfo, register, registry: AdapterRegistry,
                     store: AdapterStore) -> None:
    """The config's experts (read and checked now) and the store's (read from disk on first use), each
    registered with the engine by `register(key, folder, weights_or_None)` and added to the registry.
    Only the registry's writer calls this: it also removes store folders no manifest entry names."""
    for name, spec in settings.adapters.items():
        try:
            spec = fill_from_folder(spec, spec.path)
            check_new_name(name, {base.name, AUTO_MODEL, *settings.auto_model_names})
            check_token_ids(spec.stop_token_ids, base.vocab_size, "stop_token_ids")
            weights = validate_staged(Path(spec.path), base.shape, settings.max_adapter_rank, base.names,
                                      settings.base_mismatch)
        except AdmissionError as exc:
            raise ConfigError(f"adapter '{name}' from {spec.path}: {exc.message}") from exc
        record = AdapterRecord.create(name, spec.path, "config", weights, spec)
        register(record.key, record.folder, weights)
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
        if not record.mixture:  # a mixture has no weights of its own
            register(record.key, record.folder, None)  # read from disk on first use
        registry.add(record)
    log.info("%d experts registered", len(registry.all()))


def describe_base(settings: Settings, folder: Path, name: str, tokenizer, config, generation_config) -> BaseInfo:
    """What the HTTP side knows of the base, from its folder's config and tokenizer (no weights needed)."""
    stop_token_ids = base_stop_token_ids(tokenizer, generation_config)
    return BaseInfo(
        name=name,
        names=frozenset({name, folder.name}),
        tokenizer=tokenizer,
        prompts=PromptEncoder(tokenizer),
        pieces=TokenPieces(tokenizer),
        stop_token_ids=stop_token_ids,
        context_window=context_window_for(settings, config),
        vocab_size=config.vocab_size,
        shape=BaseShape.from_config(config),
        formats=OutputFormats(tokenizer, config.vocab_size, stop_token_ids,
                              SchemaPolicy(settings.structured_max_string_length)),
    )


def read_base_info(settings: Settings) -> BaseInfo:
    """The base's facts without loading its weights: for a process that serves HTTP while engines
    elsewhere hold the model (the Ray Serve ingress)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    try:
        folder, name = resolve_base_folder(settings.base_model, settings.cache_dir, settings.served_model_name)
    except BaseModelError as exc:
        raise ConfigError(str(exc)) from exc
    try:
        generation_config = GenerationConfig.from_pretrained(folder)
    except OSError:  # the folder has no generation_config.json
        generation_config = None
    return describe_base(settings, folder, name, AutoTokenizer.from_pretrained(folder),
                         AutoConfig.from_pretrained(folder), generation_config)


def build_runtime(settings: Settings, registry: AdapterRegistry, store: AdapterStore, on_base_ready,
                  wake, on_freed, metrics: Metrics, restore: bool = True) -> tuple[ModelRunner, AdapterCache]:
    """On the engine thread: the base, the runner, the adapter cache; with `restore`, the experts of the
    config and the store (a Ray Serve engine replica does not: it learns each expert from the request
    that first names it)."""
    try:
        loaded = load_base(settings.base_model, settings.quantization, settings.compute_dtype, settings.device,
                           settings.cache_dir, settings.served_model_name)
    except BaseModelError as exc:
        raise ConfigError(str(exc)) from exc
    config = loaded.model.config
    context_window = context_window_for(settings, config)
    device, dtype = loaded.model.model.embed_tokens.weight.device, loaded.model.model.embed_tokens.weight.dtype
    block_bytes = kv_block_bytes(config, dtype, settings.kv_block_size)
    shape = BaseShape.from_config(config)
    try:
        kernels, _ = choose_kernels(settings.lora_kernels, device, dtype)  # before sizing: Triton needs no stack
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    adapter_bytes = LoraBank.bytes_needed(shape, settings.max_gpu_adapters, settings.max_adapter_rank, dtype,
                                          step_stack=kernels == "torch")
    num_blocks = plan_kv_blocks(settings, device, block_bytes, context_window, adapter_bytes)
    runner = ModelRunner(loaded.model, loaded.tokenizer, num_blocks, settings.kv_block_size, context_window,
                         settings.max_gpu_adapters, settings.max_adapter_rank, settings.batch_invariant,
                         kernels, settings.cuda_graphs, settings.max_batch_size)
    log.info("adapter slots: %d of rank %d (%.1f MiB%s); LoRA kernels: %s; CUDA graphs: %s",
             settings.max_gpu_adapters, runner.lora.layout.rank, adapter_bytes / 2**20,
             " with the step stack, at most" if kernels == "torch" else "", runner.lora.kernels,
             "on" if runner.graphs is not None else "off")
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB, %d tokens)", num_blocks - 1, settings.kv_block_size,
             num_blocks * block_bytes / 2**20, (num_blocks - 1) * settings.kv_block_size)
    from transformers import AutoTokenizer

    base = describe_base(settings, loaded.folder, loaded.name, AutoTokenizer.from_pretrained(loaded.folder), config,
                         getattr(loaded.model, "generation_config", None))
    cache = AdapterCache(runner.lora, base.shape, settings.max_gpu_adapters, settings.max_cpu_adapters,
                         wake=wake, on_freed=on_freed, metrics=metrics)
    if restore:
        _restore_experts(settings, base, cache.register, registry, store)
    on_base_ready(base)
    return runner, cache


def _index(classifier: ExpertClassifier, records) -> None:
    """Index the experts in one refit; if that fails, one by one, so one bad expert stays reachable by
    name only and the rest are indexed."""
    try:
        classifier.add_many({record.name: ExpertProfile.of(record) for record in records})
        return
    except Exception:
        log.exception("indexing the experts together failed; indexing them one by one")
    for record in records:
        try:
            classifier.add(record.name, ExpertProfile.of(record))
        except Exception:
            log.exception("expert %s cannot be routed to: indexing its description/examples failed", record.name)


def _start_classifier(state: ServerState) -> None:
    """Load the sentence encoders and index every expert, beside the engine, not on its thread."""
    try:
        classifier = ExpertClassifier(RouterEncoder.embedded())
    except FileNotFoundError as exc:
        state.router.unavailable_reason = str(exc)
        log.warning(state.router.unavailable_reason)
        return
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
    log.info("router ready (%s): %d experts routable, %d of %d background prompts kept", classifier.encoder_name,
             len(classifier.experts()), classifier.background_kept(), classifier.background_size)


def _share_cores(state: ServerState, settings: Settings):
    """On CPU, serving steps down to the cores a training run leaves free while one runs (Engine.set_threads
    says why), and takes them back after; on CUDA the two do not compete for cores and nothing changes."""
    import torch

    serving = torch.get_num_threads()
    if settings.device != "cpu" and torch.cuda.is_available():  # the model is on the GPU
        return lambda active: None
    busy = max(1, serving - settings.fine_tune_threads * settings.max_running_fine_tunes)

    def on_training(active: bool) -> None:
        state.engine.set_threads(busy if active else serving)
        log.info("fine-tuning %s: serving uses %d CPU threads", "running" if active else "idle",
                 busy if active else serving)

    return on_training


def _attach_base(state: ServerState, settings: Settings, info: BaseInfo) -> None:
    """The base is known: the router over the registry, fine-tuning, and the classifier (in its own thread)."""
    state.router = ExpertRouter(state.registry, info.name, settings.router_margin, settings.router_fallback,
                                # a mixture needs all its adapters on the device at once
                                settings.auto_model_names,
                                min(settings.max_experts_per_request, settings.max_gpu_adapters),
                                settings.router_top_k, settings.router_mix_temperature)
    state.base = info
    if settings.fine_tuning:
        defaults = TrainingDefaults(settings.base_model, settings.cache_dir, settings.quantization,
                                    info.context_window, settings.fine_tune_threads,
                                    settings.fine_tune_checkpoint_every)
        state.jobs = FineTuning(Path(settings.data_dir) / "fine_tuning", info.tokenizer, info.stop_token_ids,
                                defaults, lambda job, folder: register_trained(state, job, folder),
                                settings.max_running_fine_tunes, _share_cores(state, settings))
        state.jobs.start()
    if settings.router == "embedded":
        state.router_thread = threading.Thread(target=_start_classifier, args=(state,), name="loraplex-router",
                                               daemon=True)
        state.router_thread.start()
    else:
        state.router.unavailable_reason = "routing is off (router: none)"


def _watch(metrics: Metrics, engine, settings: Settings) -> None:
    """The gauges read from the engine (local or remote) at scrape time."""
    metrics.watch(
        running=lambda: engine.num_running,
        waiting=lambda: engine.num_waiting,
        tiers=engine.adapter_counts,
        kv_blocks=engine.kv_usage,
        kv_block_bytes=engine.kv_block_bytes,
        adapter_memory=engine.adapter_memory,
        lora_activity=engine.lora_activity,
        max_lora=settings.max_gpu_adapters,
        vllm_aliases=settings.vllm_metric_aliases,
    )


def _delete_later(store: AdapterStore):
    def delete_retired(folder: str) -> None:
        # off the engine thread: file removal is no work for the thread that owns the model
        threading.Thread(target=store.delete_files, args=(folder,), daemon=True).start()

    return delete_retired


def create_state(settings: Settings, restore: bool = True) -> ServerState:
    """The single-process server: the engine thread loads the model, then the base is attached.
    `restore=False`: an engine that starts with no experts (a Ray Serve engine replica)."""
    registry = AdapterRegistry()
    store = AdapterStore(settings.data_dir)
    state: ServerState
    metrics = Metrics()
    engine = Engine(
        load_runner=lambda: build_runtime(settings, registry, store, lambda info: _attach_base(state, settings, info),
                                          engine.wake, _delete_later(store), metrics, restore),
        config=EngineConfig(max_batch_size=settings.max_batch_size, max_queued=settings.max_queued_requests,
                            max_step_tokens=settings.max_step_tokens, max_step_slowdown=settings.max_step_slowdown,
                            prefix_caching=settings.prefix_caching),
        metrics=metrics,
    )
    _watch(metrics, engine, settings)
    state = ServerState(settings=settings, registry=registry, store=store, engine=engine, metrics=metrics)
    return state


def create_ingress_state(settings: Settings, make_engine) -> ServerState:
    """The HTTP side of a server whose engines run elsewhere (Ray Serve): the base's facts are read without
    its weights, the experts restored into the registry (this process is the store's only writer), and
    `make_engine(metrics, on_freed)` gives the engine facade requests are submitted to."""
    registry = AdapterRegistry()
    store = AdapterStore(settings.data_dir)
    metrics = Metrics()
    engine = make_engine(metrics, _delete_later(store))
    _watch(metrics, engine, settings)
    state = ServerState(settings=settings, registry=registry, store=store, engine=engine, metrics=metrics)
    info = read_base_info(settings)
    _restore_experts(settings, info, engine.register_adapter, registry, store)
    _attach_base(state, settings, info)
    return state
