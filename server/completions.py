"""POST /v1/chat/completions: messages -> chat template -> dispatch -> one response or an SSE stream."""
from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from server.dispatch import Call, check_prompt_chars, collect, engine_failed, route_headers, stream, submit
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.sse import sse, sse_error
from server.state import ServerState


def last_user_text(messages) -> str:
    """What the router classifies: the newest user turn."""
    return next((m.text() for m in reversed(messages) if m.role == "user"), messages[-1].text())


def _logprobs(call: Call, entries: list[dict] | None) -> dict | None:
    return {"content": entries or [], "refusal": None} if call.params.logprobs else None


async def _complete(call: Call, request: Request, state: ServerState) -> JSONResponse:
    answer = await collect(call, request, state)
    if answer is None:
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    body = {
        "id": call.completion_id,
        "object": "chat.completion",
        "created": call.created,
        "model": call.route.expert,
        "choices": [
            {
                "index": choice.index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": _logprobs(call, choice.logprobs),
                "finish_reason": choice.finish_reason,
            }
            for choice in answer.choices
        ],
        "usage": answer.usage,
    }
    return JSONResponse(body, headers=route_headers(call.route))


async def _stream(call: Call, state: ServerState, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        body = {
            "id": call.completion_id,
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": call.route.expert,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if include_usage:
            body["usage"] = None
        return body

    for index in range(len(call.seqs)):
        yield sse(chunk(index, {"role": "assistant", "content": ""}))
    async with aclosing(stream(call, state)) as outputs:
        async for index, out, usage in outputs:
            if out.error:
                yield sse_error(engine_failed(out))
                break
            if out.text or out.logprobs:  # a held-back stop string can leave logprobs with no text
                yield sse(chunk(index, {"content": out.text}, logprobs=_logprobs(call, out.logprobs)))
            if out.finish_reason:
                yield sse(chunk(index, {}, out.finish_reason))
            if usage and include_usage:
                yield sse({**chunk(0, {}), "choices": [], "usage": usage})
    yield sse("[DONE]")


async def chat_completions(req: ChatCompletionRequest, request: Request, state: ServerState):
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true.", param="top_logprobs")
    state.require_ready()
    check_prompt_chars(sum(len(m.text()) for m in req.messages), "messages", state)
    # tokenizing a long prompt takes ~0.4 s per MB: in a worker thread, so /health and other requests never wait on it
    prompt_ids = await state.in_text_pool(state.base.prompts.render, req.messages)
    call = await submit(req, prompt_ids, last_user_text(req.messages), request, state, "chatcmpl")
    if not req.stream:
        return await _complete(call, request, state)
    return StreamingResponse(
        _stream(call, state, req.include_usage()),
        media_type="text/event-stream",
        headers={**route_headers(call.route), "Cache-Control": "no-cache"},
    )
