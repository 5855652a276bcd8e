"""One generation request on its way out: its answer collected whole, or streamed as Server-Sent
Events through the one streaming loop both endpoints share (each endpoint only shapes chunks).
"""
from __future__ import annotations

import asyncio
from contextlib import aclosing
from dataclasses import dataclass
from typing import AsyncIterator, ClassVar

from fastapi import Request
from fastapi.responses import JSONResponse, StreamingResponse

from router.resolve import Route, mixture_label
from server.api.dispatch import Call
from server.api.errors import APIError
from server.api.sse import sse, sse_error
from server.api.state import ServerState
from server.api.tracing import record_phases
from server.engine.sampling import TokenLogprob
from server.engine.sequence import EngineOutput


@dataclass
class Choice:
    index: int
    text: str
    logprobs: list[TokenLogprob]
    finish_reason: str | None = None


@dataclass
class Collected:
    choices: list[Choice]
    usage: dict


class _Usage:
    """Token counts over the choices: the prompt once, every choice's completion."""

    def __init__(self, call: Call):
        self.call = call
        self.prompt_tokens = len(call.seqs[0].prompt_ids)
        self.completion_tokens = 0
        self.cached_tokens = 0  # of the prompt, as the first choice found it in the prefix cache
        self.finish_reasons: dict[int, str] = {}

    def finish(self, index: int, out: EngineOutput) -> bool:
        """Count a finished choice; True once every choice has finished (then the outcome is recorded)."""
        self.completion_tokens += out.completion_tokens
        self.finish_reasons[index] = out.finish_reason
        if index == 0:
            self.cached_tokens = out.cached_tokens
        done = len(self.finish_reasons) == len(self.call.seqs)
        if done:
            first, outcome = self.call.seqs[0], self.call.outcome
            outcome.finish_reason = self.finish_reasons[0]
            outcome.prompt_tokens, outcome.completion_tokens = self.prompt_tokens, self.completion_tokens
            outcome.ttft_s = round(first.first_token_time - first.arrival_time, 4) if first.first_token_time else None
            record_phases(first, self.prompt_tokens, self.completion_tokens, self.cached_tokens)
        return done

    def as_dict(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens,
                "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


REPLICA_HEADER = "X-Loraplex-Replica"


def route_headers(route: Route, replica: str | None = None) -> dict[str, str]:
    """The router's decision (and, on Ray Serve, the engine replica that served the request)."""
    headers = {"X-Expert": mixture_label(route.named) if route.mixture else route.model,
               "X-Router-Source": route.source}
    if route.score is not None:
        headers["X-Router-Score"] = f"{route.score:.4f}"
    if route.margin is not None:
        headers["X-Router-Margin"] = f"{route.margin:+.4f}"
    if route.reason:
        headers["X-Router-Reason"] = route.reason
    if replica is not None:
        headers[REPLICA_HEADER] = replica
    return headers


# an engine error's kind -> (status, code): a server stopping or an adapter that cannot load is
# "try again later" (503); a request whose generation broke is the server's fault (500)
# an engine replica lost with the request on it (Ray Serve) is 503 too: a retry lands on another
# a format the grammar library cannot follow with the model's tokens (server/engine/constraint.py) is 400
_ENGINE_ERRORS = {"shutdown": (503, "shutting_down"), "adapter": (503, "adapter_unavailable"),
                  "replica": (503, "replica_unavailable"), "format": (400, "format_unsatisfiable")}


def engine_failed(out: EngineOutput) -> APIError:
    status, code = _ENGINE_ERRORS.get(out.error_kind, (500, "generation_failed"))
    return APIError(status, out.error or "generation failed", code=code)


async def _cancel_on_disconnect(call: Call, request: Request, state: ServerState) -> None:
    """Wait for the client to go away; then cancel its request and wake the collector."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    call.cancel(state.engine)
    call.outputs.put_nowait(None)


async def collect(call: Call, request: Request, state: ServerState) -> Collected | None:
    """Every choice's whole answer, or None when the client went away first (its request is cancelled)."""
    watcher = asyncio.create_task(_cancel_on_disconnect(call, request, state))
    choices = [Choice(index, "", []) for index in range(len(call.seqs))]
    counts = _Usage(call)
    try:
        while True:
            item = await call.outputs.get()
            if item is None:
                return None
            index, out = item
            if out.error:
                raise engine_failed(out)
            choice = choices[index]
            choice.text += out.text
            choice.logprobs += out.logprobs or []
            if out.finish_reason:
                choice.finish_reason = out.finish_reason
                if counts.finish(index, out):
                    return Collected(choices, counts.as_dict())
    except BaseException:
        call.cancel(state.engine)
        raise
    finally:
        watcher.cancel()


async def stream(call: Call, state: ServerState) -> AsyncIterator[tuple[int, EngineOutput, dict | None]]:
    """(choice index, piece, usage once every choice is done) until all choices finish or one fails.

    Leaving early (the client went away, the server closes the stream) cancels the request.
    """
    counts = _Usage(call)
    finished = False
    try:
        while True:
            index, out = await call.outputs.get()
            if out.error:
                # every choice still open ends with a finish_reason ("abort": the server ended it), then the error
                call.outcome.finish_reason = "error"
                for open_index in range(len(call.seqs)):
                    if open_index not in counts.finish_reasons:
                        yield open_index, EngineOutput("", "abort"), None
                yield index, out, None
                return
            done = bool(out.finish_reason) and counts.finish(index, out)
            yield index, out, counts.as_dict() if done else None
            if done:
                finished = True
                return
    finally:
        if not finished:
            call.cancel(state.engine)


class ChunkShaper:
    """How one endpoint writes its answer: the chunk envelope is shared, the choices are the endpoint's."""

    OBJECT: ClassVar[str]  # the stream chunk's `object` (chat.completion.chunk, text_completion)

    def __init__(self, call: Call, include_usage: bool = False):
        self.call, self.include_usage = call, include_usage

    def chunk(self, choices: list[dict]) -> dict:
        call = self.call
        body = {"id": call.completion_id, "object": self.OBJECT, "created": call.created, "model": call.route.model,
                "choices": choices}
        if self.include_usage:
            body["usage"] = None
        return body

    def opening(self, index: int) -> dict | None:
        """The first chunk of a choice before any text (the chat role, an echoed prompt), if any."""
        return None

    def piece(self, index: int, out: EngineOutput) -> dict | list[dict] | None:
        """The chunk(s) carrying a piece of a choice's text (and its logprobs); None or []: nothing to send yet."""
        raise NotImplementedError

    def finish(self, index: int, reason: str) -> dict:
        """The chunk that ends a choice."""
        raise NotImplementedError

    def finish_chunks(self, index: int, reason: str) -> list[dict]:
        """Everything still to send for a choice that ended (a shaper that held text back sends it here)."""
        return [self.finish(index, reason)]

    def usage(self, usage: dict) -> dict:
        """The last chunk, with the usage of the whole request (stream_options.include_usage)."""
        return {**self.chunk([]), "usage": usage}


async def _events(call: Call, state: ServerState, shaper: ChunkShaper, include_usage: bool) -> AsyncIterator[bytes]:
    for index in range(len(call.seqs)):
        opening = shaper.opening(index)
        if opening is not None:
            yield sse(opening)
    async with aclosing(stream(call, state)) as outputs:
        async for index, out, usage in outputs:
            if out.error:
                yield sse_error(engine_failed(out))
                break
            if out.text or out.logprobs:  # a held-back stop string can leave logprobs with no text
                chunks = shaper.piece(index, out)
                for chunk in chunks if isinstance(chunks, list) else [chunks]:
                    if chunk is not None:
                        yield sse(chunk)
            if out.finish_reason:
                for chunk in shaper.finish_chunks(index, out.finish_reason):
                    yield sse(chunk)
            if usage and include_usage:
                yield sse(shaper.usage(usage))
    yield sse("[DONE]")


def streaming_response(call: Call, state: ServerState, shaper: ChunkShaper, include_usage: bool) -> StreamingResponse:
    """The answer as Server-Sent Events, ending with `data: [DONE]`; the route in the headers."""
    return StreamingResponse(_events(call, state, shaper, include_usage), media_type="text/event-stream",
                             headers={**route_headers(call.route, call.replica), "Cache-Control": "no-cache"})


async def complete_response(call: Call, request: Request, state: ServerState, body) -> JSONResponse:
    """The whole answer as one JSON body, `body(collected)` shaping it; 499 when the client went away first."""
    answer = await collect(call, request, state)
    if answer is None:
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    return JSONResponse(body(answer), headers=route_headers(call.route, call.replica))
