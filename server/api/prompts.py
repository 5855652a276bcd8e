"""Prompts as token ids: chat messages through the base's chat template, raw text as it is."""
from __future__ import annotations

import json
import re
import secrets

from models.base_model import FALLBACK_CHATML
from server.api.protocol import ChatMessage, Tool
from server.api.structured import CALL_CLOSE, CALL_OPEN, tool_prompt

def _turn_text(message: ChatMessage) -> str:
    """A turn's text; an assistant turn's tool calls follow it in the format the grammar enforces."""
    text = message.text()
    for call in message.calls():
        try:
            arguments = json.loads(call.arguments)
        except (ValueError, RecursionError):
            arguments = call.arguments
        text += ("\n" if text else "") + CALL_OPEN + json.dumps({"name": call.name, "arguments": arguments}) \
            + CALL_CLOSE
    return text


class PromptEncoder:
    """Messages -> prompt token ids with the base's chat template, and raw text -> token ids.

    Special tokens typed inside a message are text, never control tokens: a user who writes
    "<|im_end|><|im_start|>system" gets those characters tokenized as characters (as vLLM and
    llama.cpp do), so they cannot close their turn and fake a system or assistant turn. Only
    the template's own special tokens are encoded as such. To do that, each special-token
    string inside a message is replaced by a marker carrying a per-call random nonce before the
    template runs; the rendered prompt is encoded around the markers, and each marker becomes
    the special string's plain-text tokens.

    Thread-safe (it is called from worker threads, off the event loop): it only reads the
    tokenizer, through the Rust tokenizer's encode_batch, which also releases the GIL.
    """

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self._tokenizer = tokenizer
        self._backend = tokenizer.backend_tokenizer
        specials = sorted({t.content for t in tokenizer.added_tokens_decoder.values() if t.special}, key=len,
                          reverse=True)  # longest first, so one special inside another is not split
        plain = Tokenizer.from_str(self._backend.to_str())  # a private copy, flag set once, never shared
        plain.encode_special_tokens = True
        self._index = {text: index for index, text in enumerate(specials)}
        self._plain_ids = [plain.encode(text, add_special_tokens=False).ids for text in specials]
        self._special_re = re.compile("|".join(re.escape(text) for text in specials)) if specials else None
        # No token covers more characters than its vocabulary entry has (byte-level entries have one
        # character per byte, SentencePiece one per character); x4 leaves room for a normalizer that
        # merges characters. So a text of n characters is at least n / max_chars_per_token tokens,
        # which refuses a megabyte prompt for a 2k context in microseconds instead of tokenizing it.
        longest = max(map(len, [*tokenizer.get_vocab(), *specials]))
        self.max_chars_per_token = 4 * longest

    def min_tokens(self, chars: int) -> int:
        """A lower bound on the tokens of any text of `chars` characters."""
        return chars // self.max_chars_per_token

    def render(self, messages: list[ChatMessage], tools: list[Tool] | None = None) -> list[int]:
        """The prompt for `messages`; `tools` (when the request may call them) are announced in the
        format structured.py enforces: by the chat template when it knows `<tool_call>` tags, else in
        a system message of ours. Earlier calls and tool results in the history are rendered too."""
        nonce = secrets.token_hex(8)
        marker = re.compile(f"\ue000{nonce}:([0-9]+)\ue001")

        def mark(text: str) -> str:
            if self._special_re is None:
                return text
            return self._special_re.sub(lambda m: f"\ue000{nonce}:{self._index[m.group()]}\ue001", text)

        # "developer" is OpenAI's newer name for the system role, "function" the legacy name of a tool result;
        # templates only know "system" and "tool"
        roles = {"developer": "system", "function": "tool"}
        conversation = [{"role": roles.get(m.role, m.role), "content": mark(_turn_text(m))} for m in messages]
        template = None if self._tokenizer.chat_template else FALLBACK_CHATML
        extra = {}
        if tools and CALL_OPEN in (self._tokenizer.chat_template or ""):
            extra["tools"] = [tool.model_dump(exclude_none=True) for tool in tools]
        elif tools:
            conversation.insert(0, {"role": "system", "content": mark(tool_prompt(tools))})
        rendered = self._tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False,
                                                       chat_template=template, **extra)
        pieces = marker.split(rendered)  # text, special index, text, special index, ..., text
        encoded = self._backend.encode_batch(pieces[0::2], add_special_tokens=False)
        ids: list[int] = list(encoded[0].ids)
        for special, text in zip(pieces[1::2], encoded[1:]):
            ids += self._plain_ids[int(special)]
            ids += text.ids
        return ids

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """A raw prompt as the tokenizer reads it (its special tokens are special: the caller wrote the template)."""
        return list(self._backend.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids)
