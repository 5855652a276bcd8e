"""Token ids -> text deltas that are safe to send: whole UTF-8 characters, never a stop string.

`IncrementalDetokenizer` decodes a sliding window of the output (as vLLM and TGI do): the
text of the newest tokens is the window's decode minus the decode of its head. A window
whose decode ends in U+FFFD is a character split across tokens: we wait for the next token.

`StopMatcher` holds back any tail of the text that could still grow into a stop string, so
the client never sees a stop string or a part of one, streaming or not.
"""
from __future__ import annotations

REPLACEMENT_CHAR = "\ufffd"


class IncrementalDetokenizer:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._ids: list[int] = []
        self._prefix_offset = 0  # window start: context so spacing decodes as in one pass
        self._read_offset = 0  # ids before this are already turned into text

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        self._ids.append(token_id)
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :])
        if len(window_text) <= len(prefix_text) or window_text.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or an incomplete character
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]

    def flush(self) -> str:
        """Text still pending at the end; a character cut off by the end is dropped, not sent broken."""
        prefix_text = self._decode(self._ids[self._prefix_offset : self._read_offset])
        window_text = self._decode(self._ids[self._prefix_offset :]).rstrip(REPLACEMENT_CHAR)
        self._prefix_offset = self._read_offset = len(self._ids)
        return window_text[len(prefix_text) :]


class StopMatcher:
    def __init__(self, stops: list[str]):
        self._stops = [s for s in dict.fromkeys(stops) if s]
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Returns (text safe to send now, whether a stop string ended the output)."""
        if not self._stops:
            return delta, False
        text = self._held + delta
        match = self._first_completed_match(text)
        if match is not None:
            self._held = ""
            return text[:match], True
        keep = self._longest_partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held

    def _first_completed_match(self, text: str) -> int | None:
        """Start of the match that completes first (smallest end; then earliest start)."""
        best: tuple[int, int] | None = None
        for stop in self._stops:
            start = text.find(stop)
            if start >= 0:
                key = (start + len(stop), start)
                if best is None or key < best:
                    best = key
        return None if best is None else best[1]

    def _longest_partial_suffix(self, text: str) -> int:
        """Length of the longest tail of `text` that is a proper prefix of some stop string."""
        longest = 0
        for stop in self._stops:
            for size in range(min(len(stop) - 1, len(text)), longest, -1):
                if text.endswith(stop[:size]):
                    longest = size
                    break
        return longest


class OutputText:
    """A request's answer as the client sees it: tokens in, safe text out.

    The engine calls `push` for each sampled token (stop tokens excluded) and `finish` once
    when generation ends for another reason (stop token, budget).
    """

    def __init__(self, tokenizer, stops: list[str]):
        self._detokenizer = IncrementalDetokenizer(tokenizer)
        self._stops = StopMatcher(stops)

    def push(self, token_id: int) -> tuple[str, bool]:
        """(text safe to send now, whether a stop string ended the answer)."""
        return self._stops.push(self._detokenizer.push(token_id))

    def finish(self) -> tuple[str, bool]:
        """Release what was held back; a stop string may still complete in the last bytes."""
        text, stopped = self._stops.push(self._detokenizer.flush())
        return (text, True) if stopped else (text + self._stops.flush(), False)
