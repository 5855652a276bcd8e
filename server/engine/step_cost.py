"""How long engine steps take, measured as they run: what sizes a prompt chunk.

A prompt chunk rides in the same forward pass as the running streams' decode rows, so every
prompt token in a step delays every stream's next token. The chunk is sized from two running
estimates, a decode-only step and the extra cost of one prompt token, so that a step with a chunk
takes about `slowdown` times a decode-only step: with slowdown 2, streams see at most ~2x their
usual inter-token gap while a long prompt is being read, whatever the model, device or batch
(a fixed token count cannot say that: the same prompt tokens cost orders of magnitude more on a
small CPU than on a GPU). With nothing decoding, nobody waits, and a chunk is the whole step budget.

Lower-priority work (batch lines) beside requests of the best priority is sized the same way: its decode
rows and prompt tokens take at most `background_slowdown - 1` of the best-priority rows' own step time, on
average: slack a step does not spend is saved (up to CREDIT_STEPS steps' worth), so where one lower-priority
row costs more than a step's slack it still runs every few steps instead of never.
What a row costs is fitted from decode-only steps of different sizes: on a GPU a row is nearly free and
batch lines fill every free row; on a small CPU, where each row costs about as much as the next, they take
only what keeps interactive streams within the bound.
"""
from __future__ import annotations

from dataclasses import dataclass

INITIAL_CHUNK = 64  # tokens, until both estimates exist
SMOOTHING = 0.2  # weight of the newest measurement
CREDIT_STEPS = 16  # steps of unspent slack lower-priority work may save up for a row or a prompt block


@dataclass
class Slack:
    """Seconds lower-priority work may add to one step, spent row by row and token by token."""

    seconds: float
    row_s: float  # one decode row
    token_s: float | None  # one prompt token (None: not measured yet, so no prompt tokens)

    def take_row(self) -> bool:
        if self.row_s > self.seconds:
            return False
        self.seconds -= self.row_s
        return True

    def tokens(self) -> int:
        """Prompt tokens the slack left still pays for."""
        if self.token_s is None:
            return 0
        return int(self.seconds / self.token_s) if self.token_s > 0 else 1 << 30

    def take_tokens(self, count: int) -> None:
        self.seconds -= count * (self.token_s or 0.0)


def _blend(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)


class StepCost:
    def __init__(self, max_step_tokens: int, slowdown: float, background_slowdown: float = 0.0):
        self.max_step_tokens = max_step_tokens
        self.slowdown = slowdown  # <= 1: no sizing, chunks fill the step budget
        self.background_slowdown = background_slowdown  # <= 1: lower-priority work is not sized
        self.decode_s: float | None = None  # a step of decode rows only
        self.token_s: float | None = None  # one prompt token added to a step
        self.decode_by_rows: dict[int, float] = {}  # decode-only step time by its number of rows
        # what lower-priority work really added to steps / what the fitted prices said it would: its rows
        # differ from the best-priority ones (other experts, other lengths), so a row of it may cost more
        self.background_factor = 1.0
        self._credit: Slack | None = None  # the last slack handed out: what the scheduler left of it is saved

    def observe(self, decode_rows: int, prompt_tokens: int, seconds: float,
                background: tuple[int, int, int, int] | None = None) -> None:
        """A step's time. `background`: the step's split (scheduler.Step.background) when lower-priority
        work was sized into it."""
        if background is not None and (background[2] or background[3]):
            self._observe_background(background, seconds)
            return
        if prompt_tokens == 0:
            if decode_rows:
                self.decode_s = _blend(self.decode_s, seconds)
                self.decode_by_rows[decode_rows] = _blend(self.decode_by_rows.get(decode_rows), seconds)
        elif decode_rows and self.decode_s is not None:
            self.token_s = _blend(self.token_s, max(seconds - self.decode_s, 0.0) / prompt_tokens)
        elif self.token_s is None:  # a prompt-only step overstates a token (it carries the fixed cost): a start
            self.token_s = seconds / prompt_tokens

    def prompt_budget(self, decode_rows: int) -> int:
        """Prompt tokens the next step may take when `decode_rows` requests decode in it."""
        room = self.max_step_tokens - decode_rows
        if decode_rows == 0 or self.slowdown <= 1:
            return room
        if self.decode_s is None or self.token_s is None:
            return min(room, INITIAL_CHUNK)
        if self.token_s == 0:
            return room
        return min(room, int(self.decode_s * (self.slowdown - 1) / self.token_s))

    def row_cost(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per decode row) of a decode-only step, fitted over the row counts seen
        (least squares); None before two different counts have been seen."""
        points = list(self.decode_by_rows.items())
        if len(points) < 2:
            return None
        mean_r = sum(r for r, _ in points) / len(points)
        mean_s = sum(t for _, t in points) / len(points)
        spread = sum((r - mean_r) ** 2 for r, _ in points)
        per_row = max(sum((r - mean_r) * (t - mean_s) for r, t in points) / spread, 0.0)
        return max(mean_s - per_row * mean_r, 0.0), per_row

    def background_slack(self, foreground_rows: int) -> Slack | None:
        """What lower-priority work may add to a step whose best-priority requests decode `foreground_rows`
        rows; None: no limit (sizing off, or nothing of the best priority is decoding)."""
        if self.background_slowdown <= 1 or foreground_rows == 0:
            self._credit = None
            return None
        fit = self.row_cost()
        alone = self.decode_by_rows.get(foreground_rows)
        if fit is None:  # before a fit: as if a step were all rows (each costing its share), the cautious guess
            if alone is None:
                alone = self.decode_s
            if alone is None:
                return Slack(0.0, 1.0, None)
            row_s = alone / foreground_rows
        else:
            fixed, row_s = fit
            if alone is None:
                alone = fixed + row_s * foreground_rows
        factor = self.background_factor
        per_step = (self.background_slowdown - 1) * alone
        saved = 0.0 if self._credit is None else max(self._credit.seconds, 0.0)
        self._credit = Slack(min(saved + per_step, CREDIT_STEPS * per_step), row_s * factor,
                             None if self.token_s is None else self.token_s * factor)
        return self._credit

    def _observe_background(self, split: tuple[int, int, int, int], seconds: float) -> None:
        fg_rows, fg_tokens, bg_rows, bg_tokens = split
        fit = self.row_cost()
        if fit is None or self.token_s is None:
            return
        fixed, row_s = fit
        alone = self.decode_by_rows.get(fg_rows, fixed + row_s * fg_rows) + fg_tokens * self.token_s
        priced = bg_rows * row_s + bg_tokens * self.token_s
        if priced > 0:
            ratio = min(max((seconds - alone) / priced, 0.5), 20.0)
            self.background_factor += SMOOTHING * (ratio - self.background_factor)
