"""Per-request sampling: greedy for temperature 0, else temperature + nucleus (top_p).

Each request owns its torch.Generator, so a seeded request draws the same tokens whatever
else shares its batch. Presence/frequency penalties and logit_bias adjust a row's logits
before it is sampled; logprobs report the model's own distribution (before temperature,
penalties and bias, as vLLM does), so they say what the model thought, not what we did.

Every legal value is served and no row can take the others down: a temperature too small to
divide by is greedy (as in vLLM), the most likely token always survives top_p, non-finite
logits (a broken adapter, an overflow) are masked out before anything samples from them, and
a row that cannot be sampled is reported as that row's error, not raised for the batch.
"""
from __future__ import annotations

import secrets
from collections import Counter
from dataclasses import dataclass, field

import torch

# Below this a temperature is greedy: logits / 1e-300 is inf (or 0/0 = NaN) in float32, and the
# distribution such a temperature asks for is the argmax to within float precision anyway.
SAMPLING_EPS = 1e-5


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
        return self.temperature < SAMPLING_EPS

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
    """A request's own generator; seeds are taken modulo 2**64, as torch itself does for negative ones."""
    generator = torch.Generator(device=device)
    generator.manual_seed(seed % 2**64 if seed is not None else secrets.randbits(63))
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
        # keep the smallest prefix whose mass reaches top_p; the most likely token always stays,
        # also for a top_p that float32 rounds to 0 (5e-324)
        outside = (sorted_probs.cumsum(-1) - sorted_probs) >= params.top_p
        outside[0] = False
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


@dataclass
class Sampled:
    """One step's draw: a token per row (None where the row failed), logprobs where asked,
    the rows whose logits held non-finite values (masked), and each failed row's reason."""

    tokens: list[int | None]
    logprobs: list[TokenLogprob | None]
    masked: list[int]
    errors: dict[int, str]


def _mask_non_finite(logits: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """NaN/inf logits set to -inf (never sampled); one reduction decides for the whole batch."""
    finite = torch.isfinite(logits)
    bad_rows = (~finite.all(dim=-1)).nonzero().flatten().tolist()
    if not bad_rows:
        return logits, []
    return logits.masked_fill(~finite, float("-inf")), bad_rows


def _sample_row(row_logits: torch.Tensor, params: SamplingParams, generator: torch.Generator,
                generated: Counter | None, argmax: int, constrain=None) -> int:
    if constrain is not None:  # a grammar: tokens it does not allow next become -inf
        row_logits = constrain(row_logits.clone())
        if not torch.isfinite(row_logits).any():
            raise ValueError("the output format allows no token the model can produce here")
        argmax = int(row_logits.argmax())
    if params.penalizes or params.logit_bias:
        row_logits = adjust_logits(row_logits, params, generated)
        if params.greedy:
            return int(row_logits.argmax())
    if not params.greedy:
        return sample_one(row_logits, params, generator)
    return argmax


def sample_batch(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator],
                 generated: list[Counter | None] | None = None, constraints: list | None = None) -> Sampled:
    """One token per row, and its logprob for rows that asked. Plain greedy rows share one argmax.

    `constraints[row]`, when given, masks that row's logits to what its output format allows
    (structured outputs); rows without one are not touched. A row whose logits are all
    non-finite, or whose sampling raises, gets an error instead of a token; the other rows are
    sampled as if it were not there.
    """
    logits, masked = _mask_non_finite(logits)
    argmax = logits.argmax(dim=-1).tolist()
    result = Sampled([None] * len(params), [None] * len(params), masked, {})
    for row in masked:
        if not torch.isfinite(logits[row]).any():
            result.errors[row] = "the model produced no finite logits for this request"
    for row, row_params in enumerate(params):
        if row in result.errors:
            continue
        try:
            token = _sample_row(logits[row], row_params, generators[row], generated[row] if generated else None,
                                argmax[row], constraints[row] if constraints else None)
            if row_params.logprobs:
                result.logprobs[row] = token_logprob(logits[row], token, row_params.top_logprobs)
        except Exception as exc:  # this row's fault; the batch goes on
            result.errors[row] = f"sampling failed: {exc}"
            continue
        result.tokens[row] = token
    return result
