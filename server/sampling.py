"""Per-request sampling: greedy for temperature 0, else temperature + nucleus (top_p).

Each request owns its torch.Generator, so a seeded request draws the same tokens whatever
else shares its batch. Presence/frequency penalties and logit_bias adjust a row's logits
before it is sampled; logprobs report the model's own distribution (before temperature,
penalties and bias, as vLLM does), so they say what the model thought, not what we did.
"""
from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = field(default_factory=dict)
    logprobs: bool = False
    top_logprobs: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    @property
    def penalizes(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0


@dataclass
class TokenLogprob:
    """The sampled token's log-probability and the `top` most likely alternatives, best first."""

    token_id: int
    logprob: float
    top: list[tuple[int, float]]


def make_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else secrets.randbits(63))
    return generator


def adjust_logits(row: torch.Tensor, params: SamplingParams, generated: Counter | None) -> torch.Tensor:
    """OpenAI's penalties over the tokens generated so far, then logit_bias; a new tensor."""
    row = row.clone()
    if params.penalizes and generated:
        ids = torch.tensor(list(generated), device=row.device)
        counts = torch.tensor(list(generated.values()), device=row.device, dtype=row.dtype)
        row[ids] -= params.frequency_penalty * counts + params.presence_penalty
    if params.logit_bias:
        ids = torch.tensor(list(params.logit_bias), device=row.device)
        row[ids] += torch.tensor(list(params.logit_bias.values()), device=row.device, dtype=row.dtype)
    return row


def sample_one(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """Draw one token from a row of float32 logits."""
    probs = torch.softmax(logits / params.temperature, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, sorted_ids = torch.sort(probs, descending=True)
        # keep the smallest prefix whose mass reaches top_p (the first token always stays)
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs, 1, generator=generator)
        return int(sorted_ids[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    alternatives = []
    if top:
        values, ids = torch.topk(logprobs, top)
        alternatives = list(zip(ids.tolist(), values.tolist()))
    return TokenLogprob(token, float(logprobs[token]), alternatives)


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 generated: list[Counter | None] | None = None) -> tuple[list[int], list[TokenLogprob | None]]:
    """One token per row, and its logprob for rows that asked. Plain greedy rows share one argmax."""
    tokens = logits.argmax(dim=-1).tolist()
    logprobs: list[TokenLogprob | None] = [None] * len(params)
    for row, row_params in enumerate(params):
        row_logits = logits[row]
        if row_params.penalizes or row_params.logit_bias:
            row_logits = adjust_logits(row_logits, row_params, generated[row] if generated else None)
            if row_params.greedy:
                tokens[row] = int(row_logits.argmax())
        if not row_params.greedy:
            tokens[row] = sample_one(row_logits, row_params, generators[row])
        if row_params.logprobs:
            logprobs[row] = token_logprob(logits[row], tokens[row], row_params.top_logprobs)
    return tokens, logprobs
