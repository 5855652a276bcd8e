"""Scale-out on Ray Serve: one ingress, N engine replicas, requests for an expert sent where it is loaded.

Every Ray call of loraplex lives in this module (Ray is the optional `loraplex[ray]` extra).

- **Ingress** (one replica): the whole HTTP app of the single-process server (OpenAI API, admin API,
  router, metrics, playground) over a `RemoteEngine`: the router decides ("auto") before an engine
  replica is chosen, and the ingress is the only writer of the adapter store and its manifest.
- **Engine replicas**: each owns one `Engine` (one GPU each on CUDA). A request on an expert is sent
  with the expert's registration key as Serve's multiplexed model id, so Serve routes it to a replica
  that already has that expert loaded, or on a miss to the replica with the fewest (Serve's model
  multiplexing; `max_num_models_per_replica` = `max_gpu_adapters`). Requests on the base carry no id and
  are load-balanced. A replica takes at most `max_batch_size` requests at once; the rest wait at the
  ingress and go to the first replica with room (spill).
- **One registry**: registration keys are versioned (a re-registered name gets a new key and folder),
  and each request carries the folders of its adapters on the shared `data_dir`, so a replica learns a
  new expert from the first request that names it (no restart, no broadcast) and can never serve stale
  weights; a retired expert is refused by the ingress (404) before any replica is asked.
- **Faults**: a replica that dies fails only the requests it was running (503 `replica_unavailable`,
  an SSE error frame in a stream); Serve replaces it, and requests still waiting at the ingress are
  served elsewhere.

Why Ray Serve rather than our own balancer: its model multiplexing is the affinity primitive a
multi-adapter server needs (route to a replica holding the model, load on the least-loaded one on a
miss, an LRU per replica), and it brings replica health checks, replacement and multi-node placement.
"""
from __future__ import annotations

import asyncio
import collections
import logging
import os
import signal
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
from opentelemetry import propagate, trace

from server.api.tracing import TRACER_NAME
from server.engine.engine import EngineStopped, QueueFull, record_token_time
from server.engine.interface import EngineHandle, Replicas
from server.engine.sequence import EngineOutput, Sequence, SequenceSpec
from server.metrics import Metrics
from server.settings import ConfigError, Settings

log = logging.getLogger("loraplex.ray")

APP_NAME = "loraplex"


def _serve():
    """Ray Serve, or a ConfigError that says how to install it."""
    try:
        from ray import serve
    except ImportError as exc:
        raise ConfigError("replicas > 0 runs on Ray Serve: install it with pip install 'loraplex[ray]'") from exc
    return serve


# ---- what crosses between the ingress and a replica (pickled by Ray) ---------------------------

@dataclass
class RemoteRequest:
    """One sequence as an engine replica needs it: its spec (everything but the callbacks), and the
    folders of its adapters on the shared store."""

    spec: SequenceSpec
    folders: dict[str, str]  # registration key -> folder on the shared store, for every adapter it needs
    trace: dict[str, str] = field(default_factory=dict)  # the request's W3C trace context (traceparent...)


@dataclass
class Placement:
    """The first item of every stream: which replica took the request, and whether it had its adapters."""

    replica: str
    hit: bool | None  # the adapters were loaded there already; None: a request on the base
    running: int  # requests running on the replica before this one
    waiting: int
    resident: tuple[str, ...]  # registration keys multiplexed on the replica after this request's
    cancelled: int  # requests the replica has dropped because the ingress cancelled them (client gone)


# ---- the engine replica ------------------------------------------------------------------------

class _Resident:
    """What Serve's multiplexing LRU holds per expert. Evicting it does not unload anything: the
    replica's own adapter cache keeps device slots and CPU copies by recency; the LRU only tells Serve
    which replica to prefer."""

    def __init__(self, key: str, resident: dict[str, "_Resident"]):
        self.key, self._resident = key, resident
        resident[key] = self

    def __del__(self):  # Serve calls it on eviction; the garbage collector may again, after a reload
        if self._resident.get(self.key) is self:
            del self._resident[self.key]


class EngineReplica:
    """One engine (the single-process server's, started with no experts) behind Serve. Not decorated
    here: `engine_deployment` adds the multiplexed loader, whose LRU size is a setting."""

    def __init__(self, settings: dict, threads: int | None = None):
        from server.startup.bootstrap import create_replica_engine

        from server.startup.tracing import configure_tracing

        if threads:
            torch.set_num_threads(threads)
        configure_tracing()  # this replica's spans, from the OTEL_* variables its worker inherited (or off)
        self.settings = Settings(**settings)
        self.engine, base = create_replica_engine(self.settings)  # an engine, no HTTP side, no experts
        self._fatal: BaseException | None = None
        self.engine.start(on_fatal=self._on_fatal)
        if not self.engine.ready.wait(1800):
            raise RuntimeError("the engine did not load the model within 30 minutes")
        if self.engine.load_error is not None:
            raise self.engine.load_error
        self.formats = base.result(60).formats  # compiles requests' output formats here
        self.replica = _serve().get_replica_context().replica_id.unique_id
        self._folders: dict[str, str] = {}
        self._known: set[str] = set()  # keys registered with this replica's engine
        self._resident: dict[str, _Resident] = {}  # keys in Serve's multiplexing LRU
        self._cancelled = 0
        log.info("engine replica %s ready", self.replica)

    def _on_fatal(self, exc: BaseException) -> None:
        self._fatal = exc

    def check_health(self) -> None:
        """Serve's health probe: a replica whose engine thread died is replaced."""
        if self._fatal is not None:
            raise RuntimeError(f"the engine failed: {self._fatal}")

    async def _load(self, key: str) -> _Resident:
        """Serve's multiplexed loader: make the expert known to this replica's engine. Its weights are read
        from the shared store by the engine's adapter cache, beside the steps, when a request needs them."""
        if key not in self._known:
            await asyncio.wrap_future(self.engine.register_adapter(key, self._folders[key]))
            self._known.add(key)
        return _Resident(key, self._resident)

    async def generate(self, request: RemoteRequest):
        """Run one sequence: yields a Placement, then the engine's outputs until it finishes or fails.
        Cancelled by the ingress (its client went away): the request leaves this engine's batch."""
        engine, spec = self.engine, request.spec
        keys = [key for key, _ in spec.adapter_mix] or ([spec.adapter_key] if spec.adapter_key else [])
        hit = all(key in self._resident for key in keys) if keys else None
        # the replica's part of the caller's trace: a child of the ingress's request span (W3C context in the
        # request), from the adapter load to the last output
        span = trace.get_tracer(TRACER_NAME).start_span(
            "engine replica", context=propagate.extract(request.trace), kind=trace.SpanKind.SERVER,
            attributes={"loraplex.replica": self.replica, "loraplex.adapter_hit": str(hit).lower(),
                        "loraplex.adapters": len(keys)})
        try:
            async for item in self._generate(request, keys, hit):
                if isinstance(item, EngineOutput) and (item.finish_reason or item.error):
                    span.set_attribute("gen_ai.usage.output_tokens", item.completion_tokens or 0)
                yield item
        finally:
            span.end()

    async def _generate(self, request: RemoteRequest, keys: list[str], hit: bool | None):
        engine, spec = self.engine, request.spec
        self._folders.update(request.folders)
        for key in keys:
            await self._load(key)  # through Serve's multiplexing wrapper (engine_deployment puts it in place)
        yield Placement(self.replica, hit, engine.num_running, engine.num_waiting, tuple(sorted(self._resident)),
                        self._cancelled)
        loop = asyncio.get_running_loop()
        outputs: asyncio.Queue = asyncio.Queue()
        constraint = None
        if spec.grammar is not None:
            from server.api.structured import OutputFormat

            constraint = (await loop.run_in_executor(None, self.formats.constraints, OutputFormat(spec.grammar), 1))[0]
        seq = spec.build(lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out), engine.device, constraint)
        try:
            engine.submit(seq)
        except (QueueFull, EngineStopped) as exc:
            kind = "shutdown" if isinstance(exc, EngineStopped) else "replica"
            yield EngineOutput("", "error", len(seq.prompt_ids), error=f"engine replica {self.replica} refused the "
                               f"request ({type(exc).__name__})", error_kind=kind)
            return
        finished = False
        try:
            while not finished:
                out = await outputs.get()
                finished = bool(out.finish_reason or out.error)
                yield out
        finally:
            if not finished:
                engine.cancel(seq)
                self._cancelled += 1

    def __del__(self):
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.stop(timeout=10)


def engine_deployment(settings: Settings, threads: int | None):
    """The engine replica deployment: `settings.replicas` copies, the multiplexing LRU sized by
    max_gpu_adapters, one GPU each on CUDA, at most max_batch_size requests each at once."""
    serve = _serve()
    loader = serve.multiplexed(max_num_models_per_replica=settings.max_gpu_adapters)(EngineReplica._load)
    # under the loader's own name: Serve's wrapper recognises a method call by that attribute
    cls = type("MultiplexedEngineReplica", (EngineReplica,), {"_load": loader})
    options = {"num_gpus": 1} if _wants_gpu(settings) else {"num_cpus": threads or 1}
    return serve.deployment(cls, name="EngineReplica", num_replicas=settings.replicas,
                            max_ongoing_requests=settings.max_batch_size, ray_actor_options=options,
                            health_check_period_s=2, health_check_timeout_s=30)


def _wants_gpu(settings: Settings) -> bool:
    return settings.device.startswith("cuda") or (settings.device == "auto" and torch.cuda.is_available())


# ---- the ingress -------------------------------------------------------------------------------

def _resolved() -> Future:
    """A Future already done: the Engine's asynchronous calls that have nothing to wait for here."""
    done: Future = Future()
    done.set_result(None)
    return done


@dataclass
class _Flight:
    seq: Sequence
    placed: asyncio.Future  # -> the replica's id, or None when the request failed before it was placed
    task: asyncio.Task | None = None
    replica: str | None = None
    trace: dict[str, str] = field(default_factory=dict)


class RemoteEngine(EngineHandle, Replicas):
    """The engine as the HTTP side sees it (submit, cancel, register, retire, counts), with the work done
    by engine replicas through a Serve handle. Lives on the ingress's event loop: submit is called there.

    It measures what a client sees through the extra hop (time to first token, inter-token gaps,
    end-to-end) into the ingress's own /metrics, with the replica each request was placed on."""

    def __init__(self, handle, metrics: Metrics, on_freed, max_queued: int):
        self._handle = handle
        self.metrics = metrics
        self._on_freed = on_freed  # a retired adapter's folder, once no request of this ingress uses it
        self.max_queued = max_queued
        self.ready = threading.Event()
        self.ready.set()  # Serve routes only to replicas whose engine has loaded (their constructor waits)
        self.load_error: BaseException | None = None
        self._flights: dict[int, _Flight] = {}
        self._folders: dict[str, str] = {}
        self._users: collections.Counter = collections.Counter()  # key -> requests of this ingress using it
        self._retiring: set[str] = set()
        self._placements: dict[str, Placement] = {}  # replica -> its latest report
        self._stopping = False

    # -- the Engine's face --

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")  # where the ingress builds a request's generator; replicas build their own

    def submit(self, seq: Sequence) -> None:
        if self._stopping:
            raise EngineStopped()
        if self.num_waiting >= self.max_queued:
            raise QueueFull()
        loop = asyncio.get_running_loop()
        flight = _Flight(seq, loop.create_future())
        propagate.inject(flight.trace)  # the request's span, current here, is the parent of the replica's work
        self._flights[id(seq)] = flight
        for key in seq.adapter_keys:
            self._users[key] += 1
        flight.task = loop.create_task(self._forward(flight))

    def cancel(self, seq: Sequence) -> None:
        seq.cancelled = True
        flight = self._flights.get(id(seq))
        if flight is not None and flight.task is not None:
            flight.task.get_loop().call_soon_threadsafe(flight.task.cancel)

    async def placed(self, seq: Sequence) -> str | None:
        flight = self._flights.get(id(seq))
        return None if flight is None else await asyncio.shield(flight.placed)

    def register_adapter(self, key: str, folder: str, weights=None) -> Future:
        """Nothing to load here: replicas read the adapter from the shared store on first use."""
        self._folders[key] = folder
        return _resolved()

    def retire_adapter(self, key: str) -> Future:
        """The ingress already refuses new requests for it; its files go once this ingress's requests on it end."""
        self._retiring.add(key)
        self._release_retired()
        return _resolved()

    def adapters_in_use(self) -> set[str]:
        """Keys that this ingress's requests in flight need (read from a fetch thread: copied, taken again
        if a request started or ended meanwhile)."""
        for _ in range(5):
            try:
                return {key for key, users in list(self._users.items()) if users > 0}
            except RuntimeError:
                continue
        raise RuntimeError("the requests in flight kept changing while they were read")

    def adapter_tier(self, key: str) -> str:
        """"device" when some replica holds it in its multiplexing set (as last reported: a set the size
        of its device slots), else "disk" (the shared store)."""
        return "device" if any(key in p.resident for p in self._placements.values()) else "disk"

    def adapter_counts(self) -> dict[str, int]:
        held = {key for p in self._placements.values() for key in p.resident}
        known = set(self._folders) - self._retiring
        return {"device": len(held & known), "disk": len(known - held)}

    def adapter_memory(self) -> tuple[int, int]:
        return 0, 0  # on the replicas

    def kv_usage(self) -> tuple[int, int]:
        return 0, 0

    def kv_block_bytes(self) -> int:
        return 0

    def graph_stats(self) -> dict[str, float]:
        return {}  # the replicas' graphs are in their own processes

    def lora_activity(self) -> tuple[list[str], list[str]]:
        running = {f.seq.model for f in self._flights.values() if f.seq.adapter_keys and f.replica is not None}
        waiting = {f.seq.model for f in self._flights.values() if f.seq.adapter_keys and f.replica is None}
        return sorted(running), sorted(waiting)

    def set_threads(self, count: int) -> Future:
        return _resolved()  # the replicas own the cores

    def replicas(self) -> dict[str, dict]:
        """Replica id -> what it reported when it last took a request: its running and waiting requests
        (before that one), the experts multiplexed there (registration keys), how many requests it has
        dropped because their clients left."""
        return {replica: {"running": p.running, "waiting": p.waiting, "experts": list(p.resident),
                          "cancelled": p.cancelled}
                for replica, p in self._placements.items()}

    @property
    def num_running(self) -> int:
        return sum(1 for f in self._flights.values() if f.replica is not None)

    @property
    def num_waiting(self) -> int:
        return sum(1 for f in self._flights.values() if f.replica is None)

    @property
    def idle(self) -> bool:
        return not self._flights

    def start(self, on_fatal=None) -> None:
        pass

    def stop(self, timeout: float | None = None) -> None:
        self._stopping = True
        for flight in list(self._flights.values()):
            self.cancel(flight.seq)

    # -- forwarding --

    async def _forward(self, flight: _Flight) -> None:
        seq = flight.seq
        stream = None
        finished = False
        try:
            request = RemoteRequest(seq.spec, {key: self._folders[key] for key in seq.adapter_keys}, flight.trace)
            options = {"stream": True}
            if seq.adapter_key is not None:
                options["multiplexed_model_id"] = seq.adapter_key  # the lead expert: the replica that holds it
            stream = self._handle.options(**options).generate.remote(request)
            async for item in stream:
                if isinstance(item, Placement):
                    self._place(flight, item)
                    continue
                self._observe(seq, item)
                seq.emit(item)
                if item.finish_reason or item.error:
                    finished = True
                    break
            if not finished:
                raise RuntimeError("the stream ended before the request finished")
        except asyncio.CancelledError:
            if stream is not None:
                stream.cancel()  # the replica's generator is cancelled: the request leaves its batch
            raise
        except Exception as exc:  # the replica died, or no replica could be reached
            if flight.replica:
                message = f"engine replica {flight.replica} stopped while serving this request; retry it"
                self._placements.pop(flight.replica, None)
            else:
                message = f"no engine replica could take this request ({type(exc).__name__}); retry it"
            log.warning("request %s: %s", seq.request_id, message, exc_info=exc)
            self.metrics.request_failures.labels(self.metrics.label(seq.model), "replica").inc()
            seq.emit(EngineOutput("", "error", len(seq.prompt_ids), seq.generated, error=message,
                                  error_kind="replica"))
        finally:
            if not flight.placed.done():
                flight.placed.set_result(None)
            self._flights.pop(id(seq), None)
            for key in seq.adapter_keys:
                self._users[key] -= 1
            self._release_retired()

    def _place(self, flight: _Flight, placement: Placement) -> None:
        flight.replica = placement.replica
        self._placements[placement.replica] = placement
        hit = "base" if placement.hit is None else ("hit" if placement.hit else "miss")
        self.metrics.replica_requests.labels(placement.replica, hit).inc()
        self.metrics.queue_wait.labels(self.metrics.label(flight.seq.model)).observe(time.monotonic() - flight.seq.arrival_time)
        if not flight.placed.done():
            flight.placed.set_result(placement.replica)

    def _observe(self, seq: Sequence, out: EngineOutput) -> None:
        if out.error:
            self.metrics.request_failures.labels(self.metrics.label(seq.model), out.error_kind or "fault").inc()
            return
        now = record_token_time(seq, self.metrics)
        if out.finish_reason:
            seq.generated = out.completion_tokens
            self.metrics.e2e.labels(self.metrics.label(seq.model)).observe(now - seq.arrival_time)
            self.metrics.prompt_tokens.labels(self.metrics.label(seq.model)).inc(out.prompt_tokens)
            self.metrics.generation_tokens.labels(self.metrics.label(seq.model)).inc(out.completion_tokens)

    def _release_retired(self) -> None:
        for key in [k for k in self._retiring if self._users[k] <= 0]:
            self._retiring.discard(key)
            self._users.pop(key, None)
            folder = self._folders.pop(key, None)
            if folder is not None:
                self._on_freed(folder)


class Ingress:
    """The HTTP app of the single-process server over a RemoteEngine (Serve builds the ASGI app after
    the constructor, `__serve_build_asgi_app__`)."""

    def __init__(self, settings: dict, engines):
        from server.startup.bootstrap import create_ingress_state
        from server.startup.tracing import configure_tracing

        configure_tracing()  # this process serves the HTTP side: its spans, from the OTEL_* variables it inherited
        self.settings = Settings(**settings)
        self.state = create_ingress_state(
            self.settings, lambda metrics, on_freed: RemoteEngine(engines, metrics, on_freed,
                                                                  self.settings.max_queued_requests))

    def __serve_build_asgi_app__(self):
        from server.api.app import create_app

        return create_app(self.state)

    def __del__(self):
        state = getattr(self, "state", None)
        if state is not None and state.router_thread is not None:
            state.router_thread.join(timeout=30)


def build_app(settings: Settings):
    """The Serve application: the ingress bound to the engine replicas."""
    serve = _serve()
    if settings.fine_tuning:
        log.info("fine-tuning is not served on Ray Serve yet (fine_tuning: false); train with `loraplex train`")
    ingress_settings = settings.model_copy(update={"fine_tuning": False})
    cpus = os.cpu_count() or 1
    threads = None if _wants_gpu(settings) else max(1, cpus // settings.replicas)
    # a replica only runs its engine: no router encoders, no fine-tuning service (the ingress owns both)
    replica_settings = settings.model_copy(update={"fine_tuning": False, "router": "none", "ui": False})
    engines = engine_deployment(settings, threads).bind(replica_settings.model_dump(), threads)
    ingress = serve.deployment(serve.ingress()(Ingress), name="Ingress", num_replicas=1,
                               max_ongoing_requests=max(100, 4 * settings.max_queued_requests),
                               ray_actor_options={"num_cpus": 0})
    return ingress.bind(ingress_settings.model_dump(), engines)


def start(settings: Settings, local_cpus: int | None = None):
    """Connect to (or start) Ray, start Serve's HTTP proxy on host:port and deploy the app; returns when
    every replica is up."""
    import ray

    from server.startup.bootstrap import read_base_info

    serve = _serve()
    # here first: a bad base_model is a clean ConfigError, not a replica constructor retried by Serve; and the
    # embedded base is converted once, before the ingress and every replica would race to convert it
    read_base_info(settings)
    if not ray.is_initialized():
        if settings.ray_address:
            ray.init(address=settings.ray_address)
        else:  # a local cluster: as many logical CPUs as replicas need, whatever this machine has
            ray.init(num_cpus=local_cpus or max(os.cpu_count() or 1, settings.replicas + 1), include_dashboard=False)
    serve.start(http_options={"host": settings.host, "port": settings.port})
    serve.run(build_app(settings), name=APP_NAME, route_prefix="/")
    log.info("serving %d engine replicas at http://%s:%d", settings.replicas, settings.host, settings.port)


def shutdown() -> None:
    import ray

    _serve().shutdown()
    ray.shutdown()


def kill_replica(replica: str) -> None:
    """Kill one engine replica's actor (fault tests and the fault benchmark); Serve starts a new one."""
    import ray

    actor = ray.get_actor(f"SERVE_REPLICA::{APP_NAME}#EngineReplica#{replica}", namespace="serve")
    ray.kill(actor, no_restart=True)


def replica_ids() -> set[str]:
    """The engine replicas alive now (their Serve actors), by the id responses name them with."""
    import ray

    prefix = f"SERVE_REPLICA::{APP_NAME}#EngineReplica#"
    names = ray.util.list_named_actors(all_namespaces=True)
    names = [entry["name"] if isinstance(entry, dict) else entry for entry in names]
    return {name[len(prefix):] for name in names if name.startswith(prefix)}


def run(settings: Settings) -> int:
    """`loraplex serve` with replicas > 0: blocks until SIGINT/SIGTERM, then stops the app and Ray."""
    start(settings)
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping the Serve app")
    shutdown()
    return 0
