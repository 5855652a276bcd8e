"""Engine-side state of one request, and what the engine reports back for it."""
from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch

from server.engine.detokenizer import OutputText
from server.engine.sampling import SamplingParams, TokenLogprob


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
    last_token: int = -1  # sampled but not yet in the KV cache
    kv_len: int = 0  # positions of this request written to its cache slot
    slot: int = -1
    cancelled: bool = False
    model: str = ""  # who serves it by name (the expert's or the base's): the metrics label, the logs
    arrival_time: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    last_token_time: float | None = None
    finish_time: float | None = None
    generated_counts: Counter | None = None  # token -> times generated; kept only for penalties
    pending_logprobs: list[TokenLogprob] = field(default_factory=list)  # of tokens whose text is not sent yet

    def __post_init__(self) -> None:
        if self.params.penalizes:
            self.generated_counts = Counter()

    def take_logprobs(self) -> list[TokenLogprob] | None:
        if not self.params.logprobs:
            return None
        taken, self.pending_logprobs = self.pending_logprobs, []
        return taken
