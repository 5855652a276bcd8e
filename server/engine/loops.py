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
the benchmarks that use it need.

A constrained answer's run of digits is watched too: a small model asked for an id or a list of codes can
write digits without end ("1234567890123456789...", "6789013456789014..."), never one block repeated
exactly, so the period check above misses it. Once `DIGIT_RUN` digits stand in a row, digits are ruled
out for one step the same way (unless the format allows nothing else): no value a program keeps as a
number has that many (an int64 has 19 digits, a double 17 significant ones, an IBAN's digits fewer than
32), and a string of them is a runaway. Free text is never steered for this (a user may ask for pi's
digits). The check costs `max_period` integer
comparisons per token: for every period p it keeps how many tokens in a row have equalled the token p
before them (a suffix is periodic with period p exactly when that run covers all but its first p tokens).
"""
from __future__ import annotations

import torch

NUDGE_SPAN = 16  # a constrained answer is steered off a loop this long (4 copies of a block of at most 4 tokens)
MIN_REPEATS = 4  # a block said 4 times over: twice or three times can be a refrain, a list's pattern
MAX_PERIOD = 64  # the longest block watched: a sentence or two
DIGIT_RUN = 32  # digits in a row a constrained answer may write before a non-digit is due (see above)


def digit_widths(tokenizer) -> dict[int, int]:
    """How many digits each token made only of digits writes (SmolLM2: one each; Llama 3 up to three), so a
    run is counted in digits whatever the tokenizer. Byte-level and SentencePiece pieces spell digits as
    themselves; a piece with a space marker is not a digit token."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {token: len(piece) for token, piece in enumerate(pieces)
            if piece and piece.isascii() and piece.isdigit()}


class LoopWatch:
    __slots__ = ("runs", "min_span", "max_period", "digits", "digit_run")

    def __init__(self, min_span: int, max_period: int = MAX_PERIOD, digits: dict[int, int] | None = None):
        self.min_span = min_span
        self.max_period = max_period
        self.runs = [0] * (max_period + 1)  # runs[p]: tokens in a row equal to the token p before them
        self.digits = digits  # digit_widths(), for a constrained answer; None: digits are not counted
        self.digit_run = 0  # digits the answer now ends with

    @property
    def runaway_digits(self) -> bool:
        """The answer ends in `DIGIT_RUN` digits or more: the next token should not be one."""
        return self.digit_run >= DIGIT_RUN

    def push(self, tokens: list[int], generated: int) -> int:
        """After `tokens[-1]`, the `generated`-th token of the answer (tokens: prompt and answer): the loop's
        period when the answer now ends in a loop (the loop's next token is `tokens[-period]`), else 0. Only
        answer tokens are compared (a prompt may repeat itself)."""
        last = len(tokens) - 1
        token, runs = tokens[last], self.runs
        if self.digits is not None:
            width = self.digits.get(token, 0)
            self.digit_run = self.digit_run + width if width else 0
        for period in range(1, min(self.max_period, generated - 1) + 1):
            if tokens[last - period] == token:
                runs[period] += 1
                span = runs[period] + period
                if span >= self.min_span and span >= MIN_REPEATS * period:
                    return period
            else:
                runs[period] = 0
        return 0


def steer_off(constraint, ban: int | torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`constraint`'s mask on a row's logits, and `ban` (the token continuing a loop, or every digit token)
    ruled out too, unless the format allows nothing else."""
    values = constraint(values)
    allowed = torch.isfinite(values)
    ban = torch.as_tensor(ban, device=values.device)
    if int(allowed[ban].sum()) and int(allowed.sum()) > int(allowed[ban].sum()):
        values[ban] = float("-inf")
    return values
