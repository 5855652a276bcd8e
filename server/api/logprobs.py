"""Token ids -> OpenAI logprob entries: the token's text, its exact UTF-8 bytes, and alternatives.

A token may hold part of a character (byte-level BPE splits emoji across tokens), so `bytes`
is the truth and `token` is those bytes decoded with U+FFFD for the incomplete part, as
OpenAI does. Runs at the HTTP edge, with the edge's own tokenizer: the engine hands out typed
TokenLogprob values and never builds OpenAI shapes.
"""
from __future__ import annotations

import re
from functools import lru_cache

from server.engine.sampling import TokenLogprob

LOWEST_LOGPROB = -9999.0  # OpenAI's floor; also keeps -inf out of the JSON
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte <-> printable character table (what byte-level BPE vocabularies are written in)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[chr(byte)] = byte
        else:
            chars[chr(256 + extra)] = byte
            extra += 1
    return chars


class TokenPieces:
    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = type(getattr(backend, "decoder", None)).__name__
        self._alphabet = _byte_level_alphabet() if decoder == "ByteLevel" else None
        self.token_bytes = lru_cache(maxsize=65536)(self._token_bytes)

    def _token_bytes(self, token_id: int) -> bytes:
        piece = self._tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:
            return b""
        if self._alphabet is not None and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        match = _BYTE_TOKEN.fullmatch(piece)
        if match:  # SentencePiece byte fallback
            return bytes([int(match.group(1), 16)])
        return piece.replace("\u2581", " ").encode("utf-8")  # SentencePiece marks spaces with U+2581

    def text(self, token_id: int) -> str:
        """The token's text: its bytes, with U+FFFD for a partial character (as OpenAI writes it)."""
        return self.token_bytes(token_id).decode("utf-8", errors="replace")

    @staticmethod
    def value(logprob: float) -> float:
        """A logprob as JSON can carry it: -inf floored at OpenAI's -9999."""
        return max(logprob, LOWEST_LOGPROB)

    def _item(self, token_id: int, logprob: float) -> dict:
        return {"token": self.text(token_id), "logprob": self.value(logprob), "bytes": list(self.token_bytes(token_id))}

    def entry(self, logprob: TokenLogprob) -> dict:
        """One element of OpenAI's `logprobs.content`."""
        return {**self._item(logprob.token_id, logprob.logprob),
                "top_logprobs": [self._item(token_id, value) for token_id, value in logprob.top]}
