"""Prometheus metrics (prefix loraplex_, units in the names) in a registry of the server's own."""
from __future__ import annotations

import os
import time
from typing import Callable

import torch
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

# Latency buckets from GPU speed (ms) to a busy 2-core CPU (tens of seconds).
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.08, 0.15, 0.3, 0.6, 1.2, 2.5, 5, 10, 20, 40, 80)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024)
TOKEN_BUCKETS = (0.0005, 0.001, 0.002, 0.004, 0.008, 0.015, 0.03, 0.06, 0.12, 0.25, 0.5, 1, 2, 4)
# The expert labels that are not a registered name: a mixture asked for by a request (its members are
# counted in loraplex_mixture_requests_total), a request nothing served, and any other name (one retired
# while its last requests finished, say). Labels never carry a client's raw model string: each distinct
# string would be a new series, and anyone who may send a request could grow /metrics without bound.
MIXTURE_LABEL, NO_EXPERT_LABEL, OTHER_LABEL = "mixture", "none", "other"
FIXED_LABELS = frozenset({MIXTURE_LABEL, NO_EXPERT_LABEL, OTHER_LABEL})


MEMORY_PARTS = ("weights", "kv_cache_pool", "kv_cache_used", "adapter_slots", "adapter_step_stack")


def _resident_bytes() -> float:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _cuda(stat: Callable[[], int]) -> Callable[[], float]:
    return lambda: float(stat()) if torch.cuda.is_available() else 0.0


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("loraplex_requests_total", "Chat and text completion requests by outcome",
                                ["adapter", "finish_reason", "status"], registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens_total", "Prompt tokens", ["adapter"], registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens_total", "Generated tokens", ["adapter"],
                                         registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Arrival to first token", ["adapter"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.inter_token = Histogram("loraplex_inter_token_latency_seconds", "Gap between a request's tokens",
                                     ["adapter"], buckets=TOKEN_BUCKETS, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds", "Arrival to last token", ["adapter"],
                             buckets=LATENCY_BUCKETS, registry=r)
        self.queue_wait = Histogram("loraplex_queue_wait_seconds", "Arrival to admission into the batch",
                                    ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.mixture_requests = Counter("loraplex_mixture_requests_total",
                                        "Requests that blended several experts, counted once per member expert",
                                        ["expert"], registry=r)
        # tenants are labelled by the name an admin gave them (never a key): as many series as tenants exist
        self.tenant_tokens = Counter("loraplex_tenant_tokens_total", "Tokens of tenants' completions",
                                     ["tenant", "kind"], registry=r)
        self.tenant_refusals = Counter("loraplex_tenant_rate_limited_total",
                                       "Tenants' requests refused by their limits (429)", ["tenant"], registry=r)
        self.adapter_loads = Counter("loraplex_adapter_loads_total", "Adapters read from disk", registry=r)
        self.adapter_evictions = Counter("loraplex_adapter_evictions_total", "Adapters evicted from the device",
                                         registry=r)
        self.adapter_load_time = Histogram("loraplex_adapter_load_seconds", "Reading one adapter from disk",
                                           buckets=LATENCY_BUCKETS, registry=r)
        self.router_decisions = Counter("loraplex_router_decisions_total", "Routing decisions",
                                        ["source", "expert"], registry=r)
        self.router_latency = Histogram("loraplex_router_latency_seconds", "Classifier routing time",
                                        buckets=LATENCY_BUCKETS, registry=r)
        self.non_finite_logits = Counter("loraplex_non_finite_logits_total",
                                         "Decode rows whose logits held NaN/inf (masked before sampling)",
                                         ["adapter"], registry=r)
        self.request_failures = Counter("loraplex_request_failures_total",
                                        "Requests the engine ended with an error, by kind (fault, adapter, shutdown, format, replica)",
                                        ["adapter", "kind"], registry=r)
        self.loop_stops = Counter("loraplex_loop_stops_total",
                                  "Answers ended because their free text repeated one block over and over "
                                  "(loop_stop_tokens)", ["adapter"], registry=r)
        self.loop_nudges = Counter("loraplex_loop_nudges_total",
                                   "Steps where a constrained answer was steered off a loop or a run of digits (the "
                                   "token continuing it, or every digit, ruled out)", ["adapter"], registry=r)
        self.replica_requests = Counter("loraplex_replica_requests_total",
                                        "Requests placed on each Ray Serve engine replica; adapter: hit (the "
                                        "replica held the expert), miss (it loaded it), base",
                                        ["replica", "adapter"], registry=r)
        # experts fetched on first use from adapter_sources: `source` is a source's name from the config, never
        # anything a request said
        self.adapter_fetches = Counter("loraplex_adapter_fetches_total",
                                       "Fetches of an expert from an adapter source, by outcome", ["source", "outcome"],
                                       registry=r)
        self.adapter_fetch_time = Histogram("loraplex_adapter_fetch_seconds", "One fetch from an adapter source: "
                                            "download, admission checks, registration", ["source"],
                                            buckets=LATENCY_BUCKETS, registry=r)
        self.adapter_fetched_bytes = Counter("loraplex_adapter_fetched_bytes_total",
                                             "Bytes downloaded from adapter sources", ["source"], registry=r)
        self.adapter_cache_hits = Counter("loraplex_adapter_cache_hits_total",
                                          "Requests for a fetched expert that was in the cache", registry=r)
        self.adapter_cache_misses = Counter("loraplex_adapter_cache_misses_total",
                                            "Requests for an unregistered name an adapter source may resolve "
                                            "(fetched, joined a fetch, or refused)", registry=r)
        self.adapter_cache_evictions = Counter("loraplex_adapter_cache_evictions_total",
                                               "Fetched experts evicted from the cache to make room", registry=r)
        self.batch_size = Gauge("loraplex_batch_size", "Rows in the latest decode step", registry=r)
        self.decode_rows = Histogram("loraplex_decode_batch_rows", "Requests decoded together, per decode step",
                                     buckets=ROW_BUCKETS, registry=r)
        self.prefix_queried_tokens = Counter("loraplex_prefix_cache_queried_tokens_total",
                                             "Prompt tokens looked up in the prefix cache", registry=r)
        self.prefix_hit_tokens = Counter("loraplex_prefix_cache_hit_tokens_total",
                                         "Prompt tokens whose KV came from the prefix cache", registry=r)
        self.preemptions = Counter("loraplex_preemptions_total",
                                   "Running requests whose KV blocks were taken back (computed again later)",
                                   registry=r)
        self._gauges: dict[str, Gauge] = {}
        self._registered: Callable[[str], bool] = lambda name: True  # set by label_names_from()
        # (metric, the label that names an expert): what forget_expert clears
        self._per_expert = [(self.requests, "adapter"), (self.prompt_tokens, "adapter"),
                            (self.generation_tokens, "adapter"), (self.ttft, "adapter"),
                            (self.inter_token, "adapter"), (self.e2e, "adapter"), (self.queue_wait, "adapter"),
                            (self.non_finite_logits, "adapter"), (self.request_failures, "adapter"),
                            (self.loop_stops, "adapter"), (self.loop_nudges, "adapter"),
                            (self.router_decisions, "expert"), (self.mixture_requests, "expert")]

    def label_names_from(self, registered: Callable[[str], bool]) -> None:
        """Expert labels are limited to names for which `registered(name)` holds (the base, registered
        experts and mixtures) and FIXED_LABELS; label() maps every other name to OTHER_LABEL."""
        self._registered = registered

    def label(self, name: str | None) -> str:
        """The expert label for `name`: itself if registered now, else a shared, fixed one."""
        if name is None:
            return NO_EXPERT_LABEL
        return name if name in FIXED_LABELS or self._registered(name) else OTHER_LABEL

    def forget_expert(self, name: str) -> None:
        """Drop every series labelled with a retired expert: deleted experts must not pile up in /metrics."""
        for metric, label in self._per_expert:
            metric.remove_by_labels({label: name})

    def watch_adapter_cache(self, used: Callable[[], int], limit: int) -> None:
        """The fetched-expert cache's disk use, read at scrape time."""
        cache = Gauge("loraplex_adapter_cache_bytes", "Store bytes of experts fetched from adapter sources, and the "
                      "limit (adapter_cache_bytes)", ["state"], registry=self.registry)
        cache.labels(state="used").set_function(used)
        cache.labels(state="limit").set(limit)

    def watch(self, running: Callable[[], float], waiting: Callable[[], float],
              tiers: Callable[[], dict[str, int]], kv_blocks: Callable[[], tuple[int, int]],
              kv_block_bytes: Callable[[], int], adapter_memory: Callable[[], tuple[int, int]] = lambda: (0, 0),
              lora_activity: Callable[[], tuple[list[str], list[str]]] | None = None,
              max_lora: int = 0, vllm_aliases: bool = False,
              graphs: Callable[[], dict[str, float]] = lambda: {},
              memory: Callable[[], dict[str, int]] = lambda: {}) -> None:
        """Gauges read at scrape time from the live engine."""
        r = self.registry
        parts = Gauge("loraplex_memory_bytes", "Memory the engine holds, by part: the base's weights as stored, the "
                      "KV cache pool (allocated; on a CPU resident only as blocks are first used) and the part of it "
                      "live requests hold, the adapter slots holding an adapter, the LoRA step stack",
                      ["part"], registry=r)
        for part in MEMORY_PARTS:
            parts.labels(part=part).set_function(lambda part=part: memory().get(part, 0))
        if lora_activity is not None:
            r.register(GatewayCollector(running, waiting, lambda: kv_blocks()[0] / max(kv_blocks()[1], 1),
                                        lora_activity, max_lora, vllm_aliases))
        blocks = Gauge("loraplex_kv_cache_blocks", "KV cache blocks: in use, and in the pool", ["state"], registry=r)
        blocks.labels(state="used").set_function(lambda: kv_blocks()[0])
        blocks.labels(state="total").set_function(lambda: kv_blocks()[1])
        Gauge("loraplex_kv_cache_usage_ratio", "Share of the KV cache pool in use (0-1)",
              registry=r).set_function(lambda: kv_blocks()[0] / max(kv_blocks()[1], 1))
        Gauge("loraplex_kv_cache_used_bytes", "Bytes of KV cache held by live requests",
              registry=r).set_function(lambda: kv_blocks()[0] * kv_block_bytes())
        Gauge("loraplex_requests_running", "Requests in the decode batch", registry=r).set_function(running)
        Gauge("loraplex_requests_waiting", "Requests queued for admission", registry=r).set_function(waiting)
        Gauge("loraplex_process_resident_memory_bytes", "Resident memory of the server process",
              registry=r).set_function(_resident_bytes)
        Gauge("loraplex_accelerator_memory_allocated_bytes", "torch.cuda.memory_allocated (0 on CPU)",
              registry=r).set_function(_cuda(torch.cuda.memory_allocated))
        Gauge("loraplex_accelerator_memory_reserved_bytes", "torch.cuda.memory_reserved (0 on CPU)",
              registry=r).set_function(_cuda(torch.cuda.memory_reserved))
        slots = Gauge("loraplex_adapter_memory_bytes", "Adapter slot pool on the compute device: bytes of slots "
                      "holding an adapter, and of the whole pool", ["state"], registry=r)
        slots.labels(state="used").set_function(lambda: adapter_memory()[0])
        slots.labels(state="total").set_function(lambda: adapter_memory()[1])
        shapes = Gauge("loraplex_cuda_graph_shapes", "Decode-step shapes replayed from CUDA graphs: captured at "
                       "start and still trusted, and disabled (a failed capture, or a first replay unlike the eager "
                       "step; those shapes run eagerly)", ["state"], registry=r)
        shapes.labels(state="captured").set_function(lambda: graphs().get("captured", 0))
        shapes.labels(state="disabled").set_function(lambda: graphs().get("disabled", 0))
        Gauge("loraplex_cuda_graph_replays", "Decode steps replayed from CUDA graphs since start",
              registry=r).set_function(lambda: graphs().get("replays", 0))
        Gauge("loraplex_cuda_graph_memory_bytes", "GPU memory the captured graphs took at start (0 without them)",
              registry=r).set_function(lambda: graphs().get("memory_bytes", 0))
        resident = Gauge("loraplex_adapters_resident", "Adapters per residency tier", ["tier"], registry=r)
        for tier in ("device", "cpu", "disk"):
            resident.labels(tier=tier).set_function(lambda tier=tier: tiers().get(tier, 0))


class GatewayCollector:
    """What adapter-aware gateways (the Gateway API inference extension's endpoint picker, vLLM's
    production-stack router) read from each replica, in vLLM's shapes.

    `loraplex_lora_requests_info{max_lora, running_lora_adapters, waiting_lora_adapters}`: one series whose
    labels name the experts with running and waiting requests (comma-separated) and the experts a replica
    keeps on the device, and whose value is the time that set last changed, as vLLM's
    `vllm:lora_requests_info`. Unlike vLLM, the series of earlier sets are not kept: a scrape sees one.
    With `vllm_metric_aliases`, the same series is also exported under vLLM's names, with
    `vllm:num_requests_running`, `vllm:num_requests_waiting` and `vllm:kv_cache_usage_perc` (and its older
    name `vllm:gpu_cache_usage_perc`), so a gateway configured for vLLM works unchanged.
    """

    def __init__(self, running, waiting, kv_usage, lora_activity, max_lora: int, vllm_aliases: bool):
        self._running, self._waiting, self._kv_usage = running, waiting, kv_usage
        self._activity, self._max_lora, self._aliases = lora_activity, max_lora, vllm_aliases
        self._last: tuple[str, str] | None = None
        self._since = 0.0

    def collect(self):
        running, waiting = self._activity()
        labels = (",".join(running), ",".join(waiting))
        if labels != self._last:
            self._last, self._since = labels, time.time()
        names = ("loraplex_lora_requests_info", "vllm:lora_requests_info") if self._aliases else (
            "loraplex_lora_requests_info",)
        for name in names:
            family = GaugeMetricFamily(name, "Experts with running and waiting requests (value: when that changed)",
                                       labels=["max_lora", "running_lora_adapters", "waiting_lora_adapters"])
            family.add_metric([str(self._max_lora), *labels], self._since)
            yield family
        if self._aliases:
            yield GaugeMetricFamily("vllm:num_requests_running", "Requests in the decode batch", value=self._running())
            yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests queued", value=self._waiting())
            for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):
                yield GaugeMetricFamily(name, "Share of the KV cache in use (0-1)", value=self._kv_usage())
