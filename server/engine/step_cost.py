"""How long engine steps take, measured as they run: what sizes a prompt chunk.

A prompt chunk rides in the same forward pass as the running streams' decode rows, so every
prompt token in a step delays every stream's next token. The chunk is sized from two running
estimates, a decode-only step and the extra cost of one prompt token, so that a step with a chunk
takes about `slowdown` times a decode-only step: with slowdown 2, streams see at most ~2x their
usual inter-token gap while a long prompt is being read, whatever the model, device or batch
(a fixed token count cannot say that: the same prompt tokens cost orders of magnitude more on a
small CPU than on a GPU). With nothing decoding, nobody waits, and a chunk is the whole step budget.
"""
from __future__ import annotations

INITIAL_CHUNK = 64  # tokens, until both estimates exist
SMOOTHING = 0.2  # weight of the newest measurement


def _blend(old: float | None, new: float) -> float:
    return new if old is None else old + SMOOTHING * (new - old)


class StepCost:
    def __init__(self, max_step_tokens: int, slowdown: float):
        self.max_step_tokens = max_step_tokens
        self.slowdown = slowdown  # <= 1: no sizing, chunks fill the step budget
        self.decode_s: float | None = None  # a step of decode rows only
        self.token_s: float | None = None  # one prompt token added to a step

    def observe(self, decode_rows: int, prompt_tokens: int, seconds: float) -> None:
        if prompt_tokens == 0:
            if decode_rows:
                self.decode_s = _blend(self.decode_s, seconds)
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
