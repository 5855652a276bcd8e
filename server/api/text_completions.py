"""POST /v1/completions (OpenAI's legacy text completions): a raw prompt, continued as is.

No chat template: the prompt (text, or token ids) goes to the model verbatim, which is what
evaluation harnesses and few-shot prompts expect. Routing, experts, stops and sampling are
the chat endpoint's (dispatch.py); only the prompt and the response shape differ.
"""
from __future__ import annotations

from fastapi import Request

from adapters.admission import check_token_ids
from server.api.dispatch import Call, check_prompt_chars, submit
from server.api.errors import APIError
from server.api.logprobs import TokenPieces
from server.api.protocol import CompletionRequest
from server.api.responses import ChunkShaper, Collected, complete_response, streaming_response
from server.api.state import BaseInfo, ServerState
from server.engine.sampling import TokenLogprob
from server.engine.sequence import EngineOutput

# OpenAI's default for this endpoint: a short continuation unless asked for more.
DEFAULT_MAX_TOKENS = 16


def _prompt(req: CompletionRequest, base: BaseInfo) -> tuple[list[int], str]:
    """(token ids, text) of the one prompt, given as text or as token ids. Runs in a worker thread."""
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        return base.prompts.encode(prompt), prompt
    check_token_ids(prompt, base.vocab_size, "prompt")
    return list(prompt), base.tokenizer.decode(prompt, skip_special_tokens=False)


class _LegacyLogprobs:
    """The legacy logprobs object: parallel lists, built up chunk by chunk."""

    def __init__(self, pieces: TokenPieces, offset: int):
        self.pieces = pieces
        self.offset = offset  # where the next token starts in the returned text

    def shape(self, entries: list[TokenLogprob]) -> dict:
        tokens, offsets = [], []
        for entry in entries:
            tokens.append(self.pieces.text(entry.token_id))
            offsets.append(self.offset)
            self.offset += len(tokens[-1])
        return {
            "tokens": tokens,
            "token_logprobs": [self.pieces.value(entry.logprob) for entry in entries],
            "top_logprobs": [{self.pieces.text(token): self.pieces.value(value) for token, value in entry.top}
                             for entry in entries],
            "text_offset": offsets,
        }


def _choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


class _TextShape(ChunkShaper):
    """text_completion bodies and stream chunks (the same object, as at OpenAI)."""

    OBJECT = "text_completion"

    def __init__(self, call: Call, state: ServerState, echo: str, include_usage: bool = False):
        super().__init__(call, include_usage)
        self.echo = echo
        # each choice's text offsets run on their own, after the echoed prompt
        self.offsets = [_LegacyLogprobs(state.base.pieces, len(echo)) for _ in call.seqs]

    def _logprobs(self, index: int, entries: list[TokenLogprob] | None) -> dict | None:
        return self.offsets[index].shape(entries or []) if self.call.params.logprobs else None

    def body(self, answer: Collected) -> dict:
        choices = [_choice(c.index, self.echo + c.text, self._logprobs(c.index, c.logprobs), c.finish_reason)
                   for c in answer.choices]
        return {**self.chunk(choices), "usage": answer.usage}

    def opening(self, index: int) -> dict | None:
        return self.chunk([_choice(index, self.echo, None, None)]) if self.echo else None

    def piece(self, index: int, out: EngineOutput) -> dict:
        return self.chunk([_choice(index, out.text, self._logprobs(index, out.logprobs), None)])

    def finish(self, index: int, reason: str) -> dict:
        return self.chunk([_choice(index, "", None, reason)])


async def text_completions(req: CompletionRequest, request: Request, state: ServerState):
    state.require_ready()
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (prompt tokens are not scored).", param="echo")
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), "prompt", state)
    prompt_ids, prompt_text = await state.in_text_pool(_prompt, req, state.base)  # off the event loop
    formats = state.base.formats
    output = await state.in_text_pool(lambda: formats.for_guided(req) or formats.for_response_format(req.response_format))
    call = await submit(req, prompt_ids, prompt_text, request, state, "cmpl", default_max_tokens=DEFAULT_MAX_TOKENS,
                        output=output)
    echo = prompt_text if req.echo else ""
    if not req.stream:
        return await complete_response(call, request, state, _TextShape(call, state, echo).body)
    return streaming_response(call, state, _TextShape(call, state, echo, req.include_usage()), req.include_usage())
