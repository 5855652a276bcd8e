"""POST /v1/completions (OpenAI's legacy text completions): a raw prompt, continued as is.

No chat template: the prompt (text, or token ids) goes to the model verbatim, which is what
evaluation harnesses and few-shot prompts expect. Routing, experts, stops and sampling are
the chat endpoint's (server/dispatch.py); only the prompt and the response shape differ.
"""
from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.dispatch import Call, check_prompt_chars, collect, engine_failed, route_headers, stream, submit
from server.errors import APIError
from server.protocol import CompletionRequest
from server.sse import sse, sse_error
from server.state import ServerState

# OpenAI's default for this endpoint: a short continuation unless asked for more.
DEFAULT_MAX_TOKENS = 16


def _prompt(req: CompletionRequest, base) -> tuple[list[int], str]:
    """(token ids, text) of the one prompt, given as text or as token ids. Runs in a worker thread."""
    prompt, tokenizer, vocab_size = req.single_prompt(), base.tokenizer, base.vocab_size
    if isinstance(prompt, str):
        return base.prompts.encode(prompt), prompt
    outside = [token for token in prompt if not 0 <= token < vocab_size]
    if outside:
        raise APIError(400, f"prompt token {outside[0]} is outside the vocabulary of {vocab_size} tokens.",
                       param="prompt")
    return list(prompt), tokenizer.decode(prompt, skip_special_tokens=False)


class _Logprobs:
    """The legacy logprobs object: parallel lists, built up chunk by chunk."""

    def __init__(self, offset: int):
        self.offset = offset  # where the next token starts in the returned text

    def shape(self, entries: list[dict]) -> dict:
        offsets = []
        for entry in entries:
            offsets.append(self.offset)
            self.offset += len(entry["token"])
        return {
            "tokens": [entry["token"] for entry in entries],
            "token_logprobs": [entry["logprob"] for entry in entries],
            "top_logprobs": [{alt["token"]: alt["logprob"] for alt in entry["top_logprobs"]} for entry in entries],
            "text_offset": offsets,
        }


def _choice(index: int, text: str, logprobs: dict | None, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": finish_reason}


def _body(call: Call, choices: list[dict]) -> dict:
    return {"id": call.completion_id, "object": "text_completion", "created": call.created,
            "model": call.route.expert, "choices": choices}


async def _complete(call: Call, request: Request, state: ServerState, echo: str) -> JSONResponse:
    answer = await collect(call, request, state)
    if answer is None:
        return JSONResponse({}, status_code=499)  # nobody is listening any more

    def logprobs(entries: list[dict]) -> dict | None:
        return _Logprobs(len(echo)).shape(entries) if call.params.logprobs else None

    body = _body(call, [_choice(c.index, echo + c.text, logprobs(c.logprobs), c.finish_reason)
                        for c in answer.choices])
    body["usage"] = answer.usage
    return JSONResponse(body, headers=route_headers(call.route))


async def _stream(call: Call, state: ServerState, include_usage: bool, echo: str) -> AsyncIterator[bytes]:
    def chunk(choices: list[dict]) -> dict:
        body = _body(call, choices)
        if include_usage:
            body["usage"] = None
        return body

    offsets = [_Logprobs(len(echo)) for _ in call.seqs]  # each choice's text offsets run on their own
    if echo:
        for index in range(len(call.seqs)):
            yield sse(chunk([_choice(index, echo, None, None)]))
    async with aclosing(stream(call, state)) as outputs:
        async for index, out, usage in outputs:
            if out.error:
                yield sse_error(engine_failed(out))
                break
            if out.text or out.logprobs:
                shaped = offsets[index].shape(out.logprobs or []) if call.params.logprobs else None
                yield sse(chunk([_choice(index, out.text, shaped, None)]))
            if out.finish_reason:
                yield sse(chunk([_choice(index, "", None, out.finish_reason)]))
            if usage and include_usage:
                yield sse({**chunk([]), "usage": usage})
    yield sse("[DONE]")


async def text_completions(req: CompletionRequest, request: Request, state: ServerState):
    state.require_ready()
    if req.echo and req.logprobs is not None:
        raise APIError(400, "echo with logprobs is not supported (prompt tokens are not scored).", param="echo")
    prompt = req.single_prompt()
    if isinstance(prompt, str):
        check_prompt_chars(len(prompt), "prompt", state)
    prompt_ids, prompt_text = await state.in_text_pool(_prompt, req, state.base)  # off the event loop
    call = await submit(req, prompt_ids, prompt_text, request, state, "cmpl", default_max_tokens=DEFAULT_MAX_TOKENS)
    echo = prompt_text if req.echo else ""
    if not req.stream:
        return await _complete(call, request, state, echo)
    return StreamingResponse(
        _stream(call, state, req.include_usage(), echo),
        media_type="text/event-stream",
        headers={**route_headers(call.route), "Cache-Control": "no-cache"},
    )
