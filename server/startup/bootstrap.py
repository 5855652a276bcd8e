"""Start-up wiring: the server's state, and on the engine thread the base, the runner and the experts.

Experts come from two places and pass the same checks: the config's `adapters` (read in
place) and the managed store's manifest (registered over HTTP before a restart).
"""
from __future__ import annotations

import logging
import threading
from concurrent.futures import Future
from pathlib import Path

from pydantic import ValidationError

from adapters.admission import AdmissionError
from models.base_model import BaseModelError, base_stop_token_ids, load_base, resolve_base_folder
from adapters.lora import BaseShape
from adapters.registry import AdapterRegistry
from adapters.store import AdapterStore
from router.resolve import ExpertRouter
from server.api.logprobs import TokenPieces
from server.api.prompts import PromptEncoder
from server.api.state import BaseInfo, ServerState
from server.api.schemas import SchemaPolicy
from server.api.structured import OutputFormats
from server.engine.engine import Engine, EngineConfig
from server.engine.model_runner import ModelRunner, kv_block_bytes, resolve_kv_dtype
from server.engine.lora_batch import LoraBank, aligned_rank, choose_kernels
from server.engine.residency import AdapterCache
from server.experts.service import Experts, ExpertPolicy, ServedBase
from server.experts.sources import CachePolicy, build_sources
from server.experts.spec import ExpertRegistration
from server.jobs.manager import JobError
from server.jobs.batch_store import BatchStore
from server.jobs.response_store import ResponseStore
from server.jobs.service import FineTuning, TrainingDefaults
from server.jobs.store import FileStore
from server.metrics import Metrics
from server.settings import ConfigError, Settings
from server.startup.kv_budget import graph_budget_bytes, plan_kv_blocks
from server.tenants.store import TenantStore

log = logging.getLogger("loraplex.bootstrap")


def context_window_for(settings: Settings, model_config) -> int:
    limit = getattr(model_config, "max_position_embeddings", None) or settings.context_window
    return min(settings.context_window, limit)


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
                              SchemaPolicy(settings.structured_max_string_length, settings.structured_max_decimals)),
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


def build_runner(settings: Settings, num_blocks: int | None = None) -> tuple[ModelRunner, object]:
    """The base loaded and the model runner over it, as `settings` say: (runner, the loaded base). The KV pool
    is sized by the settings (kv_budget.py) unless `num_blocks` is given (a benchmark's)."""
    try:
        loaded = load_base(settings.base_model, settings.quantization, settings.compute_dtype, settings.device,
                           settings.cache_dir, settings.served_model_name)
    except BaseModelError as exc:
        raise ConfigError(str(exc)) from exc
    config = loaded.model.config
    context_window = context_window_for(settings, config)
    device, dtype = loaded.model.model.norm.weight.device, loaded.model.model.norm.weight.dtype
    kv_dtype = resolve_kv_dtype(settings.kv_cache_dtype, dtype, hasattr(loaded.model.model.layers[0].self_attn, "qkv_proj"))
    block_bytes = kv_block_bytes(config, kv_dtype, settings.kv_block_size)
    shape = BaseShape.from_config(config)
    try:
        # before sizing: Triton needs no step stack
        kernels, _ = choose_kernels(settings.lora_kernels, device, dtype, shape, aligned_rank(settings.max_adapter_rank))
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    adapter_bytes = LoraBank.bytes_needed(shape, settings.max_gpu_adapters, settings.max_adapter_rank, dtype,
                                          step_stack=kernels != "triton")
    graph_bytes = graph_budget_bytes(settings, device, config, dtype, context_window, kernels == "triton",
                                     settings.max_gpu_adapters, adapter_bytes)
    if num_blocks is None:
        num_blocks = plan_kv_blocks(settings, device, block_bytes, context_window, adapter_bytes, graph_bytes)
    try:  # e.g. attention: kernel where the CPU kernel cannot run
        runner = ModelRunner(loaded.model, loaded.tokenizer, num_blocks, settings.kv_block_size, context_window,
                             settings.max_gpu_adapters, settings.max_adapter_rank, settings.batch_invariant,
                             kernels, settings.cuda_graphs, settings.max_batch_size, graph_bytes,
                             settings.kv_cache_dtype, settings.attention)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc
    log.info("adapter slots: %d of rank %d (%.1f MiB%s); LoRA kernels: %s; CUDA graphs: %s",
             settings.max_gpu_adapters, runner.lora.max_rank, adapter_bytes / 2**20,
             " with the step stack, at most" if kernels != "triton" else "", runner.lora.kernels,
             f"{len(runner.graphs.shapes)} decode shapes ({graph_bytes / 2**20:.0f} MiB planned)"
             if runner.graphs is not None else "off")
    log.info("KV cache: %d blocks of %d tokens (%.1f MiB in %s, %d tokens%s)", num_blocks - 1,
             settings.kv_block_size, num_blocks * block_bytes / 2**20, str(kv_dtype).removeprefix("torch."),
             (num_blocks - 1) * settings.kv_block_size, ", resident as used" if device.type == "cpu" else "")
    log.info("decode attention: %s", "the CPU kernel (in place)" if runner.attention_kernel is not None else "torch")
    log.info("base weights: %.1f MiB (%s)", runner.weight_bytes / 2**20,
             "int4 linears, q/k/v and gate/up fused" if runner.fused else settings.quantization)
    return runner, loaded


def build_runtime(settings: Settings, on_base_ready, wake, on_freed, metrics: Metrics,
                  experts: Experts | None) -> tuple[ModelRunner, AdapterCache]:
    """On the engine thread: the base, the runner, the adapter cache; with `experts`, the experts of the
    config and the store restored into it (a Ray Serve engine replica has none: it learns each expert
    from the request that first names it)."""
    runner, loaded = build_runner(settings)
    config = loaded.model.config
    from transformers import AutoTokenizer

    base = describe_base(settings, loaded.folder, loaded.name, AutoTokenizer.from_pretrained(loaded.folder), config,
                         getattr(loaded.model, "generation_config", None))
    cache = AdapterCache(runner.lora, base.shape, settings.max_gpu_adapters, settings.max_cpu_adapters,
                         wake=wake, on_freed=on_freed, metrics=metrics)
    if experts is not None:
        _restore(experts, settings, base, cache.register)
    on_base_ready(base)
    return runner, cache


def _served(info: BaseInfo) -> ServedBase:
    return ServedBase(info.name, info.names, info.vocab_size, info.shape)


def _restore(experts: Experts, settings: Settings, info: BaseInfo, register) -> None:
    try:
        experts.restore(settings.adapters, _served(info), settings.auto_model_names, register)
    except AdmissionError as exc:  # an expert of the config file that cannot be served
        raise ConfigError(exc.message) from exc


def _register_trained(experts: Experts, job: dict, folder: Path) -> str:
    """A finished fine-tuning job's adapter, registered as any expert is; a refusal fails the job."""
    try:
        registration = ExpertRegistration(**FineTuning.expert_of(job))
        experts.register_trained(folder, registration, job.get("_owner", ""))  # the job's tenant owns it
    except (AdmissionError, OSError, ValidationError) as exc:
        raise JobError(f"the trained adapter was not accepted by the registry: {exc}", code="adapter_refused",
                       param=None) from exc
    return registration.name


def _policy(settings: Settings) -> ExpertPolicy:
    return ExpertPolicy(tuple(settings.adapter_roots), settings.max_adapter_bytes, settings.max_adapter_rank,
                        settings.base_mismatch)


def _experts(settings: Settings, registry: AdapterRegistry, store: AdapterStore, engine, metrics: Metrics) -> Experts:
    """The Experts service, with the adapter sources of the config (their environment variables read now)."""
    cache = CachePolicy(settings.adapter_cache_bytes, settings.adapter_fetch_timeout_s,
                        settings.adapter_fetch_concurrency, settings.adapter_refusal_ttl_s)
    sources = build_sources(settings.adapter_sources, settings.adapter_fetch_timeout_s)
    if sources:
        log.info("adapter sources: %s", ", ".join(f"{s.name} ({s.kind}: {', '.join(s.patterns)})" for s in sources))
    return Experts(registry, store, engine, metrics, _policy(settings), sources, cache)


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
    state.experts.attach(_served(info), state.router)
    registry = state.registry
    state.metrics.label_names_from(lambda name: name == info.name or registry.get(name) is not None)
    if settings.fine_tuning:
        defaults = TrainingDefaults(settings.base_model, settings.cache_dir, settings.quantization,
                                    info.context_window, settings.fine_tune_threads,
                                    settings.fine_tune_checkpoint_every)
        state.jobs = FineTuning(Path(settings.data_dir) / "fine_tuning", info.tokenizer, info.stop_token_ids,
                                defaults, lambda job, folder: _register_trained(state.experts, job, folder),
                                settings.max_running_fine_tunes, _share_cores(state, settings), state.files)
        state.jobs.start()
    if settings.router == "embedded":
        state.router_thread = threading.Thread(target=state.experts.build_index, name="loraplex-router",
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
        graphs=engine.graph_stats,
        memory=getattr(engine, "memory_breakdown", lambda: {}),
        max_lora=settings.max_gpu_adapters,
        vllm_aliases=settings.vllm_metric_aliases,
    )


def _delete_later(store: AdapterStore):
    def delete_retired(folder: str) -> None:
        # off the engine thread: file removal is no work for the thread that owns the model
        threading.Thread(target=store.delete_files, args=(folder,), daemon=True).start()

    return delete_retired


def _engine(settings: Settings, metrics: Metrics, on_base_ready, on_freed, experts_of) -> Engine:
    """The engine; its thread loads the model. `experts_of()`: the Experts to restore into, asked for on
    that thread (None: none)."""
    engine = Engine(
        load_runner=lambda: build_runtime(settings, on_base_ready, engine.wake, on_freed, metrics, experts_of()),
        config=EngineConfig(max_batch_size=settings.max_batch_size, max_queued=settings.max_queued_requests,
                            max_step_tokens=settings.max_step_tokens, max_step_slowdown=settings.max_step_slowdown,
                            background_slowdown=settings.background_slowdown,
                            prefix_caching=settings.prefix_caching,
                            max_queued_per_tenant=max(1, int(settings.max_queued_requests * settings.tenant_queue_share))
                            if settings.tenants else None),
        metrics=metrics,
    )
    return engine


def _tenants(settings: Settings) -> TenantStore | None:
    """The tenants' database (tenants: true), opened before any request; None without tenants."""
    if not settings.tenants:
        return None
    store = TenantStore(settings.data_dir)
    store.start_flushing()
    log.info("tenants: %d in %s", len(store.list_tenants()), store.path)
    return store


def _stores(settings: Settings) -> dict:
    """The HTTP side's stores under data_dir: files (where they always were, beside fine-tuning's jobs),
    stored Responses, batches."""
    data = Path(settings.data_dir)
    return {"files": FileStore(data / "fine_tuning" / "files"),
            "responses": ResponseStore(data / "responses", settings.max_stored_responses),
            "batches": BatchStore(data / "batches")}


def create_state(settings: Settings) -> ServerState:
    """The single-process server: the engine thread loads the model and restores the experts, then the
    base is attached."""
    registry = AdapterRegistry()
    store = AdapterStore(settings.data_dir)
    metrics = Metrics()
    state: ServerState
    engine = _engine(settings, metrics, lambda info: _attach_base(state, settings, info), _delete_later(store),
                     lambda: state.experts)
    _watch(metrics, engine, settings)
    state = ServerState(settings=settings, registry=registry, store=store, engine=engine, metrics=metrics,
                        experts=_experts(settings, registry, store, engine, metrics), tenants=_tenants(settings),
                        **_stores(settings))
    return state


def create_replica_engine(settings: Settings) -> tuple[Engine, Future]:
    """A Ray Serve engine replica's engine, with no experts and no HTTP side: the engine, and a Future of
    the base's facts (set once the model is loaded; the replica compiles output formats with them)."""
    base: Future = Future()
    engine = _engine(settings, Metrics(), base.set_result, lambda folder: None, lambda: None)
    return engine, base


def create_ingress_state(settings: Settings, make_engine) -> ServerState:
    """The HTTP side of a server whose engines run elsewhere (Ray Serve): the base's facts are read without
    its weights, the experts restored into the registry (this process is the store's only writer), and
    `make_engine(metrics, on_freed)` gives the engine facade requests are submitted to (and `Replicas`)."""
    registry = AdapterRegistry()
    store = AdapterStore(settings.data_dir)
    metrics = Metrics()
    engine = make_engine(metrics, _delete_later(store))
    _watch(metrics, engine, settings)
    state = ServerState(settings=settings, registry=registry, store=store, engine=engine, metrics=metrics,
                        experts=_experts(settings, registry, store, engine, metrics), replicas=engine,
                        tenants=_tenants(settings), **_stores(settings))
    info = read_base_info(settings)
    _restore(state.experts, settings, info, engine.register_adapter)
    _attach_base(state, settings, info)
    return state
