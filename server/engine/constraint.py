"""A request's output format as a per-token constraint (structured outputs), held by its sequence.

The grammar is compiled at the edge (server/api/structured.py) into an llguidance matcher; here
the engine thread asks it which tokens may come next (a bitmask applied to that row's logits
only: other rows of the batch are untouched) and tells it which token was chosen. Each choice of
a request has its own matcher: the state is the text generated so far.
"""
from __future__ import annotations

import torch


class FormatDeadEnd(ValueError):
    """The grammar refused a token its own mask allowed. Seen with regexes over unusual characters (C1
    controls, lone bytes of multi-byte characters) where the library's byte-level tokens and its forced
    bytes disagree: the request's format cannot be followed with this vocabulary, so the request ends with
    a 400 naming the format (server/api/responses.py), not a server fault."""


class TokenConstraint:
    def __init__(self, matcher, vocab_size: int, grammar: str | None = None):
        import llguidance.torch as llg_torch

        self.grammar = grammar  # what the matcher was built from: an engine in another process builds its own

        self._matcher = matcher
        self._llg = llg_torch
        self._bitmask = llg_torch.allocate_token_bitmask(1, vocab_size)  # int32 words, bit i: token allowed
        self._bits = torch.arange(32, dtype=torch.int32)
        self._allowed: torch.Tensor | None = None  # the next token's mask, once prepared

    def prepare(self) -> None:
        """Compute which tokens may come next. The engine calls it in a worker thread while the
        forward pass runs (the matcher is not touched elsewhere until the step is sampled), so a
        slow mask (the library builds lexer states lazily, so a new kind of string can take a long
        time once) overlaps the model instead of adding to the step.

        The bitmask is unpacked with plain torch ops: llguidance's own apply helper compiles a
        kernel on first use (seconds), which would stall the whole batch."""
        self._llg.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        self._allowed = ((self._bitmask[0, :, None] >> self._bits) & 1).flatten().bool()

    def __call__(self, row_logits: torch.Tensor) -> torch.Tensor:
        """The row's logits with every token the format does not allow next set to -inf (in place)."""
        if self._allowed is None:
            self.prepare()
        allowed, self._allowed = self._allowed[: row_logits.shape[-1]], None
        return row_logits.masked_fill_(~allowed.to(row_logits.device), float("-inf"))

    def warm(self) -> "TokenConstraint":
        """Compute the first mask once (the library builds its lexer lazily, on the first mask):
        called where the request is prepared, so the engine's first step with it does not pay."""
        self._llg.fill_next_token_bitmask(self._matcher, self._bitmask, 0)
        return self

    def accept(self, token: int) -> None:
        """Advance past the chosen token; FormatDeadEnd if the format did not allow it."""
        self._allowed = None
        if not self._matcher.consume_token(token):
            problem = " ".join(self._matcher.get_error().replace("<non-verbose/>", "").split())
            raise FormatDeadEnd(f"The requested output format cannot be continued with this model's tokens "
                                f"(token {token}: {problem[:300]}).")

    @property
    def complete(self) -> bool:
        """The format is satisfied and allows nothing more (only the end of the turn)."""
        return self._matcher.is_stopped()
