"""POST /v1/chat/completions: schema -> router -> engine queue -> stream or one response."""
from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from adapters.admission import AdmissionError, check_stop_token_ids
from adapters.registry import AdapterRecord
from router.resolve import Route
from server.chat import render_prompt
from server.engine import EngineStopped, QueueFull
from server.errors import APIError
from server.protocol import ChatCompletionRequest
from server.sampling import SamplingParams, make_generator
from server.sequence import EngineOutput, Sequence
from server.state import ServerState


@dataclass
class _Call:
    """One accepted request on its way through the engine."""

    completion_id: str
    created: int
    route: Route
    seq: Sequence
    outputs: asyncio.Queue
    outcome: dict  # what the request-outcome middleware counts and logs


def _record_finish(call: _Call, out: EngineOutput) -> None:
    seq = call.seq
    call.outcome.update(
        finish_reason=out.finish_reason,
        prompt_tokens=out.prompt_tokens,
        completion_tokens=out.completion_tokens,
        ttft_s=round(seq.first_token_time - seq.arrival_time, 4) if seq.first_token_time else None,
    )


def _sampling_params(req: ChatCompletionRequest, prompt_len: int, state: ServerState, record: AdapterRecord | None):
    settings, base = state.settings, state.base
    defaults = record.defaults if record else {}
    room = base.context_window - prompt_len
    requested = req.requested_max_tokens()
    param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
    if room < 1:
        raise APIError(
            400,
            f"The prompt is {prompt_len} tokens, which leaves no room in the context window of "
            f"{base.context_window} tokens.",
            param="messages",
            code="context_length_exceeded",
        )
    if requested is not None and prompt_len + requested > base.context_window:
        raise APIError(
            400,
            f"The prompt ({prompt_len} tokens) plus {param} ({requested}) is {prompt_len + requested} tokens, "
            f"over the context window of {base.context_window} tokens. Shorten the prompt or lower {param}.",
            param=param,
            code="context_length_exceeded",
        )
    default_budget = defaults.get("max_tokens", settings.default_max_tokens)
    max_tokens = min(requested if requested is not None else default_budget, settings.max_tokens_limit, room)
    extra_ids = frozenset(req.stop_token_ids or ())
    try:
        check_stop_token_ids(extra_ids, base.vocab_size)
    except AdmissionError as exc:
        raise APIError(exc.status, exc.message, param=exc.param) from None
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true.", param="top_logprobs")
    logit_bias = {int(token): value for token, value in (req.logit_bias or {}).items()}
    outside = sorted(token for token in logit_bias if token >= base.vocab_size)
    if outside:
        raise APIError(400, f"logit_bias names token {outside[0]}, outside the vocabulary of {base.vocab_size} "
                            "tokens.", param="logit_bias")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.get("temperature", 1.0) if req.temperature is None else req.temperature,
        top_p=defaults.get("top_p", 1.0) if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=list(record.stop if record else ()) + req.stop_list(),
        stop_token_ids=extra_ids,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=logit_bias,
        logprobs=bool(req.logprobs),
        top_logprobs=req.top_logprobs or 0,
    )


def last_user_text(messages) -> str:
    """What the router classifies: the newest user turn."""
    return next((m.text() for m in reversed(messages) if m.role == "user"), messages[-1].text())


async def route_request(req, request: Request, state: ServerState) -> Route:
    router, header = state.router, request.headers.get("x-expert")
    if router.needs_classifier(req.model, header):
        with state.metrics.router_latency.time():
            return await asyncio.to_thread(router.by_prompt, last_user_text(req.messages))
    return router.by_name(req.model, header)


def route_headers(route: Route) -> dict[str, str]:
    headers = {"X-Expert": route.expert, "X-Router-Source": route.source}
    if route.score is not None:
        headers["X-Router-Score"] = f"{route.score:.4f}"
    if route.reason:
        headers["X-Router-Reason"] = route.reason
    return headers


async def _submit(req: ChatCompletionRequest, request: Request, state: ServerState) -> _Call:
    if state.draining:
        raise APIError(503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": "5"})
    state.require_ready()
    base = state.base
    route = await route_request(req, request, state)
    state.metrics.router_decisions.labels(route.source, route.expert).inc()
    outcome = request.scope.setdefault("state", {}).setdefault("outcome", {})
    outcome.update(expert=route.expert, source=route.source)
    record = state.registry.get(route.adapter) if route.adapter else None
    if route.adapter and record is None:  # retired between routing and here
        raise APIError(404, f"The expert '{route.adapter}' does not exist.", param="model", code="model_not_found")
    prompt_ids = render_prompt(base.tokenizer, req.messages)
    params = _sampling_params(req, len(prompt_ids), state, record)
    # ends a turn: EOS and the template's end-of-turn token (unless ignore_eos), the expert's
    # own stop tokens, and the request's stop_token_ids
    stop_ids = params.stop_token_ids | (record.stop_token_ids if record else frozenset())
    if not params.ignore_eos:
        stop_ids |= base.stop_token_ids
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue = asyncio.Queue()
    seq = Sequence(
        request_id=request.scope.get("state", {}).get("request_id", uuid.uuid4().hex),
        prompt_ids=prompt_ids,
        adapter=record.key if record else None,
        label=route.expert,
        params=params,
        stop_token_ids=stop_ids,
        generator=make_generator(params.seed, state.engine.runner.device),
        emit=lambda out: loop.call_soon_threadsafe(outputs.put_nowait, out),
    )
    try:
        state.engine.submit(seq)
    except QueueFull:
        raise APIError(
            429, "Too many requests are queued; retry shortly.", code="queue_full", headers={"Retry-After": "1"}
        ) from None
    except EngineStopped:
        raise APIError(503, "The server is shutting down.", code="shutting_down") from None
    if record is not None:
        state.registry.count_request(record.name)
    return _Call(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), route, seq, outputs, outcome)


def _usage(out: EngineOutput) -> dict:
    return {
        "prompt_tokens": out.prompt_tokens,
        "completion_tokens": out.completion_tokens,
        "total_tokens": out.prompt_tokens + out.completion_tokens,
    }


def _engine_failed(out: EngineOutput) -> APIError:
    return APIError(503, out.error or "generation failed", code="engine_error")


async def _cancel_on_disconnect(call: _Call, request: Request, state: ServerState) -> None:
    """Wait for the client to go away; then cancel its request and wake the collector."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    state.engine.cancel(call.seq)
    call.outputs.put_nowait(None)


async def _complete(call: _Call, request: Request, state: ServerState) -> JSONResponse:
    watcher = asyncio.create_task(_cancel_on_disconnect(call, request, state))
    parts: list[str] = []
    logprobs: list[dict] = []
    try:
        while True:
            out = await call.outputs.get()
            if out is None:
                return JSONResponse({}, status_code=499)  # nobody is listening any more
            if out.error:
                raise _engine_failed(out)
            parts.append(out.text)
            logprobs += out.logprobs or []
            if out.finish_reason:
                _record_finish(call, out)
                break
    finally:
        watcher.cancel()
    body = {
        "id": call.completion_id,
        "object": "chat.completion",
        "created": call.created,
        "model": call.route.expert,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "".join(parts)},
                "logprobs": _logprobs(call, logprobs),
                "finish_reason": out.finish_reason,
            }
        ],
        "usage": _usage(out),
    }
    return JSONResponse(body, headers=route_headers(call.route))


def _logprobs(call: _Call, entries: list[dict] | None) -> dict | None:
    return {"content": entries or [], "refusal": None} if call.seq.params.logprobs else None


def _sse(payload: dict | str) -> bytes:
    data = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False)
    return f"data: {data}\n\n".encode()


async def _stream(call: _Call, state: ServerState, include_usage: bool) -> AsyncIterator[bytes]:
    def chunk(delta: dict, finish_reason: str | None = None, logprobs: dict | None = None) -> dict:
        body = {
            "id": call.completion_id,
            "object": "chat.completion.chunk",
            "created": call.created,
            "model": call.route.expert,
            "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}],
        }
        if include_usage:
            body["usage"] = None
        return body

    finished = False
    try:
        yield _sse(chunk({"role": "assistant", "content": ""}))
        while True:
            out = await call.outputs.get()
            if out.error:
                error = _engine_failed(out)
                yield _sse({"error": {"message": error.message, "type": "server_error", "param": None, "code": error.code}})
                break
            if out.text or out.logprobs:  # a held-back stop string can leave logprobs with no text
                yield _sse(chunk({"content": out.text}, logprobs=_logprobs(call, out.logprobs)))
            if out.finish_reason:
                _record_finish(call, out)
                yield _sse(chunk({}, out.finish_reason))
                if include_usage:
                    yield _sse({**chunk({}), "choices": [], "usage": _usage(out)})
                break
        finished = True
        yield _sse("[DONE]")
    finally:
        if not finished:  # the client went away (or the server is closing the stream)
            state.engine.cancel(call.seq)


async def chat_completions(req: ChatCompletionRequest, request: Request, state: ServerState):
    call = await _submit(req, request, state)
    if not req.stream:
        try:
            return await _complete(call, request, state)
        except BaseException:
            state.engine.cancel(call.seq)
            raise
    include_usage = bool(req.stream_options and req.stream_options.include_usage)
    return StreamingResponse(
        _stream(call, state, include_usage),
        media_type="text/event-stream",
        headers={**route_headers(call.route), "Cache-Control": "no-cache"},
    )
