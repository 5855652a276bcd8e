"""Free text that has fallen into a loop ends there.

A small model that does not end its turn rarely wanders: it repeats. SmolLM2 writes "You can call mom in
20 minutes.\n\n" again and again, or "0000...", until `max_tokens`, and the client pays for every copy
and waits for it. Once an answer's last `min_span` tokens or more are one block of at most
`TEXT_MAX_PERIOD` words (a paragraph or two: two paragraphs taking turns are one block) said at least
`TEXT_REPEATS` times over, nothing new can come of it: the answer ends there, as if the model had ended
its turn (finish_reason `stop`; `loraplex_loop_stops_total` counts them).

Free text is compared as words, not tokens (`text_words`): whitespace-only tokens are skipped and a token
counts as its text without surrounding whitespace, because the same sentence comes back after " ", then
after "\n\n" ("ĠThe" and "The" are different tokens), which an exact comparison never sees as a loop.
Two copies are enough when the block is two sentences or more (`TWICE_CHARS` characters or more, spaces
aside): a block that long said again, word for word, straight after itself is the model going round, and
waiting for a third copy of it runs past a 512-token budget (SmolLM2's "In the context of the human
experience, camels..." pair of paragraphs, on the bf16 lm_head, reached its third copy at token 576). A
shorter block is a sentence or a line, which a song's chorus or a "say it again" answer repeats on
purpose: those keep needing three copies. The size is in characters, not words, because a word here is a
token: a line of Chinese is 50 of them. Set on the design answers (`bench_loop_rule --compare block64`,
which also tries other sizes): from 300 characters down to 80 a size only ends sooner answers the rule
ends anyway, each a block going round; at 60 the first of the risky prompts' answers comes in (a
children's song); 120 is twice that.
Three copies are enough when the block is long (22 words or more, a word being a token that is not only
whitespace; with `min_span` 64 a block of 17-21 words needs 64 words of repetition, and one of 16 or
fewer 4 copies and more): a sentence said three times in a row, whitespace aside, is not a refrain or a
list's pattern (those change words), and code repeats itself with different names. Measured before the change on answers written for other prompts than the ones it is
reported on, songs, poems with refrains and code included: every answer it ended earlier was a sentence
going round. A block that comes back with a word changed here and there ends it too, after four copies
(`LoopWatch`); checked the same way (`loadtests/bench_loop_rule.py`).

A constrained answer (a JSON schema, a tool call) cut short would not parse, so it is never ended this
way: a loop inside it (`".A.A.A.A`, `com.com.com`, a string or an array repeating itself) is steered
off instead, sooner (`NUDGE_SPAN` tokens, exact tokens, `MIN_REPEATS` copies): for one step the token that
would continue the loop is ruled out, unless the format allows nothing else (`steer_off`), so the model
writes something else there, often the string's or the array's end. `ignore_eos` (run to max_tokens
whatever comes) turns the watch off, as the benchmarks that use it need.

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

from collections import deque
from typing import Callable

import torch

NUDGE_SPAN = 16  # a constrained answer is steered off a loop this long (4 copies of a block of at most 4 tokens)
MIN_REPEATS = 4  # a constrained answer's block said 4 times over (exact tokens: a short block may be a list's pattern)
TEXT_REPEATS = 3  # free text: a block said 3 times in a row, whitespace aside, over at least min_span tokens
MAX_PERIOD = 64  # the longest block watched in a constrained answer, in tokens
TEXT_MAX_PERIOD = 128  # free text's, in words: a paragraph or two going round (two sentences taking turns)
DIGIT_RUN = 32  # digits in a row a constrained answer may write before a non-digit is due (see above)
TWICE_CHARS = 120  # free text: a block of this many characters or more, spaces aside (two sentences), ends at its second copy
NEAR_REPEATS = 4  # free text: a block said 4 times over with a word changed here and there (see `LoopWatch`)
NEAR_MATCH = 0.9  # ... where at least this share of the words equal the word a block before them


def digit_widths(tokenizer) -> dict[int, int]:
    """How many digits each token made only of digits writes (SmolLM2: one each; Llama 3 up to three), so a
    run is counted in digits whatever the tokenizer. Byte-level and SentencePiece pieces spell digits as
    themselves; a piece with a space marker is not a digit token."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    return {token: len(piece) for token, piece in enumerate(pieces)
            if piece and piece.isascii() and piece.isdigit()}


def text_words(tokenizer) -> tuple[list[int], list[int]]:
    """Per token, its text without surrounding whitespace as a number (equal texts, equal numbers), -1 for a
    token that is only whitespace: what free text is compared by (see above); and that text's length in
    characters, which sizes a block for `TWICE_CHARS`. A token that is part of a character (byte-level
    pieces of CJK text or emoji decode alone to U+FFFD) keeps a number of its own, all of them would
    otherwise read as one and the same, and counts no characters: a block of text written mostly in such
    pieces is never long enough for its second copy to end it, and keeps needing three."""
    texts = tokenizer.batch_decode([[token] for token in range(len(tokenizer))])
    numbers: dict[str, int] = {}
    keys, widths = [], []
    for token, text in enumerate(texts):
        word = text.strip()
        partial = "\ufffd" in word
        keys.append(-1 if not word else numbers.setdefault(f"\0{token}" if partial else word, len(numbers)))
        widths.append(len(word.replace("\ufffd", "")))
    return keys, widths


class LoopWatch:
    """Watches one answer, token by token (`push`).

    Free text (`keys` given) is also watched for a block that comes back with a word changed here and
    there ("...for 10 minutes." / "...for 15 minutes.", "Sunday" / "Monday"), which the exact check never
    sees as one block: once, for some period p, at least `NEAR_MATCH` of the last max(min_span,
    `NEAR_REPEATS` * p) words equal the word p before them, the answer is going round too. Four copies,
    not three, and nine words in ten: a list, a table or a song's verses change more than that (a
    template line changes its item, its number and often its length, which breaks the alignment)."""

    __slots__ = ("runs", "min_span", "max_period", "digits", "digit_run", "keys", "words", "misses",
                 "windows", "near_match", "spans", "twice", "twice_runs", "widths", "ends")

    def __init__(self, min_span: int, max_period: int = MAX_PERIOD, digits: dict[int, int] | None = None,
                 keys: list[int] | None = None, repeats: int = MIN_REPEATS, near_match: float | None = NEAR_MATCH,
                 twice: int | None = None, widths: list[int] | None = None):
        """`near_match`: free text's near-repeat share (None: exact blocks only; `bench_loop_rule` compares).
        `twice`: free text's block of this many characters or more (`widths`: `text_words`' lengths) ends at
        its second copy (`TWICE_CHARS`; None: `repeats` copies whatever the block's length)."""
        self.min_span = min_span
        self.max_period = max_period
        # spans[p]: how long the repetition of a block of p must be to end the answer
        self.spans = [max(min_span, repeats * period) for period in range(max_period + 1)]
        self.twice = twice if keys is not None and widths is not None else None
        # twice_runs[p]: the run that completes a block's second copy (and covers min_span)
        self.twice_runs = [max(min_span, 2 * period) - period for period in range(max_period + 1)]
        self.widths = widths
        self.ends = [0]  # free text: characters up to and including each word (ends[i + 1]: after words[i])
        self.runs = [0] * (max_period + 1)  # runs[p]: tokens in a row equal to the token p before them
        self.digits = digits  # digit_widths(), for a constrained answer; None: digits are not counted
        self.digit_run = 0  # digits the answer now ends with
        self.keys = keys  # text_words()' numbers, for free text; None: exact tokens are compared
        self.words: list[int] = []  # free text: the answer's keys, whitespace skipped
        # free text: per period, where (word index) a word differed from the one a block before it, within
        # the period's window: max(min_span, NEAR_REPEATS * p) words
        self.near_match = near_match
        self.misses = [deque() for _ in range(max_period + 1)] if keys is not None and near_match else None
        self.windows = ([max(min_span, NEAR_REPEATS * period) for period in range(max_period + 1)]
                        if self.misses is not None else None)

    @property
    def runaway_digits(self) -> bool:
        """The answer ends in `DIGIT_RUN` digits or more: the next token should not be one."""
        return self.digit_run >= DIGIT_RUN

    def push(self, tokens: list[int], generated: int) -> int:
        """After `tokens[-1]`, the `generated`-th token of the answer (tokens: prompt and answer): the loop's
        period when the answer now ends in a loop (compared as tokens, the loop's next token is
        `tokens[-period]`; as words, a period in words), else 0. Only answer tokens are compared (a prompt
        may repeat itself)."""
        token, runs = tokens[-1], self.runs
        if self.digits is not None:
            width = self.digits.get(token, 0)
            self.digit_run = self.digit_run + width if width else 0
        if self.keys is not None:  # free text: compared as words (see above)
            key = self.keys[token] if token < len(self.keys) else token + len(self.keys)
            if key < 0:
                return 0
            self.words.append(key)
            if self.twice is not None:
                self.ends.append(self.ends[-1] + (self.widths[token] if token < len(self.widths) else 1))
            tokens, token, generated = self.words, key, len(self.words)
        last = len(tokens) - 1
        misses, near = self.misses, 0
        for period in range(1, min(self.max_period, generated - 1) + 1):
            if tokens[last - period] == token:
                runs[period] += 1
                if runs[period] + period >= self.spans[period]:
                    return period
                if (self.twice is not None and runs[period] >= self.twice_runs[period]
                        and self.ends[-1] - self.ends[-1 - period] >= self.twice):
                    return period  # a long block's second copy (see above)
            else:
                runs[period] = 0
                if misses is not None:
                    misses[period].append(last)
            if misses is not None and not near:
                window = self.windows[period]
                if last - period + 1 >= window:  # words compared at this period: those from `period` on
                    missed = misses[period]
                    while missed and missed[0] <= last - window:
                        missed.popleft()
                    if len(missed) <= (1 - self.near_match) * window:
                        near = period
        return near


def steer_off(constraint, ban: int | torch.Tensor, values: torch.Tensor,
              nudged: Callable[[], object] | None = None) -> torch.Tensor:
    """`constraint`'s mask on a row's logits, and `ban` (the token continuing a loop, or every digit token)
    ruled out too, unless the format allows nothing else; `nudged()` is called when it was ruled out (the
    metric counts steering that happened, not a format that only allows digits)."""
    values = constraint(values)
    allowed = torch.isfinite(values)
    ban = torch.as_tensor(ban, device=values.device)
    banned, total = int(allowed[ban].sum()), int(allowed.sum())
    if banned and total > banned:
        values[ban] = float("-inf")
        if nudged is not None:
            nudged()
    return values
