"""Engine-side state of one request, and what the engine reports back for it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.detokenizer import OutputText
from server.engine.loops import LoopWatch
from server.engine.sampling import SamplingParams, TokenLogprob, make_generator


@dataclass
class EngineOutput:
    """A piece of one request's answer. `finish_reason` is set exactly once, on the last piece."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str | None = None
    # why it failed: "shutdown" (the server is stopping), "adapter" (its weights could not be
    # loaded) or "fault" (this request's generation broke); the edge picks the status from it
    error_kind: str | None = None
    logprobs: list[TokenLogprob] | None = None  # of the tokens behind this piece (when asked); shaped at the edge
    cached_tokens: int = 0  # prompt tokens whose KV came from the prefix cache (usage.prompt_tokens_details)


@dataclass(frozen=True)
class SequenceSpec:
    """Everything that makes a request's sequence but its callbacks, built once at the edge. A Ray Serve
    engine replica receives it as it is (pickled) and builds the same sequence on its side: one place
    makes a Sequence, whichever engine runs it."""

    request_id: str
    prompt_ids: list[int]
    adapter_key: str | None  # the lead adapter's registration key; None: the base
    adapter_mix: tuple[tuple[str, float], ...]  # (key, weight) of a mixture; empty: one adapter or the base
    model: str  # the metrics label (server/metrics.py)
    params: SamplingParams
    stop_token_ids: frozenset[int]
    seed: int  # the generator's: the request's seed (+ its choice index), else drawn at the edge
    grammar: str | None = None  # its output format's grammar (structured outputs); None: free text
    tenant: str = ""  # whose request (fair admission: scheduler.py); "" without tenants
    priority: int = 0  # vLLM's: lower is admitted first and preempted last (batch lines run at a higher one)

    def build(self, emit: Callable[["EngineOutput"], None], device: torch.device,
              constraint: object | None = None) -> "Sequence":
        """The sequence, with its own generator on `device`; `constraint` is the matcher compiled from
        `grammar` (where the sequence runs: matchers are not shared between processes)."""
        return Sequence(request_id=self.request_id, prompt_ids=self.prompt_ids, adapter_key=self.adapter_key,
                        adapter_mix=self.adapter_mix, model=self.model, params=self.params,
                        stop_token_ids=self.stop_token_ids, generator=make_generator(self.seed, device), emit=emit,
                        constraint=constraint, spec=self, tenant=self.tenant, priority=self.priority)


@dataclass
class Sequence:
    request_id: str
    prompt_ids: list[int]
    adapter_key: str | None  # the engine's handle of the adapter's weights (a registration key); None: the base
    params: SamplingParams
    stop_token_ids: frozenset[int]
    generator: torch.Generator
    emit: Callable[[EngineOutput], None]
    output: OutputText | None = None  # built on the engine thread at admission, with its tokenizer
    generated: int = 0  # tokens sampled, the stop token included (what usage reports)
    # KV state (block_manager.py): the prompt then every sampled token; the last one sampled is
    # not yet in the cache. After a preemption all of them are computed again.
    tokens: list[int] = field(default_factory=list)
    num_computed: int = 0  # leading positions of `tokens` whose K/V are in the cache
    block_table: list[int] = field(default_factory=list)
    block_digests: list[bytes] = field(default_factory=list)
    cached_tokens: int = 0  # prompt tokens reused from the prefix cache at first admission
    admitted: bool = False  # has been in the batch (first admission starts its clocks and output)
    running: bool = False  # in the batch now (holds blocks)
    # a mixture of adapters: (key, weight) pairs, weights summing to 1; adapter_key is then the
    # highest-weighted one (its defaults apply); empty: one adapter or the base
    adapter_mix: tuple[tuple[str, float], ...] = ()
    preemptions: int = 0
    cancelled: bool = False
    model: str = ""  # who serves it by name (the expert's or the base's): the metrics label, the logs
    arrival_time: float = field(default_factory=time.monotonic)
    admitted_time: float | None = None  # first joined the batch (the end of its queue wait)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    # generated tokens counted per vocabulary entry, on the device (sampling.new_token_counts); made at
    # the first token of a request with penalties, updated by the step that samples each token
    token_counts: torch.Tensor | None = None
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not sent yet
    constraint: object | None = None  # the output format (constraint.TokenConstraint); None: free text
    loops: LoopWatch | None = None  # built at admission when params.loop_tokens (loops.py)
    loop_ban: int | torch.Tensor | None = None  # its loop's next token (or every digit token): ruled out next step
    spec: SequenceSpec | None = None  # what it was built from (a Ray Serve ingress forwards it)
    tenant: str = ""  # whose request: arrivals are admitted round-robin over tenants (scheduler.py)
    priority: int = 0  # lower runs first (scheduler.py)

    def __post_init__(self) -> None:
        self.tokens = list(self.prompt_ids)

    @property
    def adapter_keys(self) -> tuple[str, ...]:
        """Every adapter the request needs on the device."""
        if self.adapter_mix:
            return tuple(key for key, _ in self.adapter_mix)
        return () if self.adapter_key is None else (self.adapter_key,)

    @property
    def row_adapter(self):
        """What its rows ask the LoRA step for: None, a key, or the mixture (lora_batch.RowAdapter)."""
        return self.adapter_mix or self.adapter_key

    @property
    def cache_key(self) -> str | None:
        """What computes its KV: prefix-cache blocks are shared only between requests that agree on it."""
        if self.adapter_mix:
            return "mix:" + ",".join(f"{key}={weight!r}" for key, weight in self.adapter_mix)
        return self.adapter_key

    @property
    def last_token(self) -> int:
        return self.tokens[-1]

    @property
    def uncomputed(self) -> int:
        """Positions still to run through the model before the next token can be sampled."""
        return len(self.tokens) - self.num_computed

    def take_logprobs(self) -> list[TokenLogprob] | None:
        if not self.params.logprobs:
            return None
        taken, self.pending_logprobs = self.pending_logprobs, []
        return taken
