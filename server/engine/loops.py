"""Free text that has fallen into a loop ends there.

A small model that does not end its turn rarely wanders: it repeats. SmolLM2 writes "You can call mom in
20 minutes.\n\n" again and again, or "0000...", until `max_tokens`, and the client pays for every copy
and waits for it. Once an answer's last `min_span` tokens or more are one block of at most
`max_period` tokens said at least `MIN_REPEATS` times over, nothing new can come of it: the answer
ends there, as if the model had ended its turn (finish_reason `stop`, `stop_reason` "loop").

A constrained answer (a JSON schema, a tool call) cut short would not parse, so it is never ended this
way: a loop inside it (`".A.A.A.A`, `com.com.com`, a string or an array repeating itself) is steered
off instead, sooner (`NUDGE_SPAN` tokens): for one step the token that would continue the loop is ruled
out, unless the format allows nothing else (`steer_off`), so the model writes something else there, often
the string's or the array's end. `ignore_eos` (run to max_tokens whatever comes) turns the watch off, as
the benchmarks that use it need. The check costs `max_period` integer
comparisons per token: for every period p it keeps how many tokens in a row have equalled the token p
before them (a suffix is periodic with period p exactly when that run covers all but its first p tokens).
"""
from __future__ import annotations

import torch

NUDGE_SPAN = 16  # a constrained answer is steered off a loop this long (4 copies of a block of at most 4 tokens)
MIN_REPEATS = 4  # a block said 4 times over: twice or three times can be a refrain, a list's pattern
MAX_PERIOD = 64  # the longest block watched: a sentence or two


class LoopWatch:
    __slots__ = ("runs", "min_span", "max_period")

    def __init__(self, min_span: int, max_period: int = MAX_PERIOD):
        self.min_span = min_span
        self.max_period = max_period
        self.runs = [0] * (max_period + 1)  # runs[p]: tokens in a row equal to the token p before them

    def push(self, tokens: list[int], generated: int) -> int:
        """After `tokens[-1]`, the `generated`-th token of the answer (tokens: prompt and answer): the loop's
        period when the answer now ends in a loop (the loop's next token is `tokens[-period]`), else 0. Only
        answer tokens are compared (a prompt may repeat itself)."""
        last = len(tokens) - 1
        token, runs = tokens[last], self.runs
        for period in range(1, min(self.max_period, generated - 1) + 1):
            if tokens[last - period] == token:
                runs[period] += 1
                span = runs[period] + period
                if span >= self.min_span and span >= MIN_REPEATS * period:
                    return period
            else:
                runs[period] = 0
        return 0


def steer_off(constraint, token: int, values: torch.Tensor) -> torch.Tensor:
    """`constraint`'s mask on a row's logits, and `token` (the one continuing a loop) ruled out too, unless
    the format allows nothing else."""
    values = constraint(values)
    if torch.isfinite(values[token]) and int(torch.isfinite(values).sum()) > 1:
        values[token] = float("-inf")
    return values
