"""POST /v1/chat/completions: messages -> chat template -> dispatch -> one response or an SSE stream."""
from __future__ import annotations

from fastapi import Request

from server.api.dispatch import Call, check_prompt_chars, submit
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest
from server.api.responses import ChunkShaper, Collected, complete_response, streaming_response
from server.api.state import ServerState
from server.api.tool_calls import CallReader, ToolCall, read_answer
from server.engine.sampling import TokenLogprob
from server.engine.sequence import EngineOutput


def last_user_text(messages) -> str:
    """What the router classifies: the newest user turn."""
    return next((m.text() for m in reversed(messages) if m.role == "user"), messages[-1].text())


class _ChatShape(ChunkShaper):
    """chat.completion bodies and chat.completion.chunk events; with tools, calls read out of the text
    (tool_calls.py): in a stream the call's id and name come first, then its arguments as generated."""

    OBJECT = "chat.completion.chunk"

    def __init__(self, call: Call, state: ServerState, include_usage: bool = False, tools: bool = False,
                 legacy: bool = False):
        super().__init__(call, include_usage)
        self.pieces = state.base.pieces
        self.tools = tools
        self.legacy = legacy  # the request used `functions`: calls are answered as `function_call`
        self._readers: dict[int, CallReader] = {}
        self._logprobs: dict[int, list[TokenLogprob]] = {}  # of text held back, sent with the next chunk

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if not self.call.params.logprobs:
            return None
        return {"content": [self.pieces.entry(entry) for entry in entries or []], "refusal": None}

    def _finish_reason(self, calls: list[ToolCall], reason: str | None) -> str | None:
        """tool_calls (function_call) for an answer that stopped on complete calls; else the engine's reason
        (a call cut by max_tokens says length)."""
        if calls and reason == "stop" and all(c.complete for c in calls):
            return "function_call" if self.legacy else "tool_calls"
        return reason

    def _message(self, content: str, calls: list[ToolCall]) -> dict:
        if not calls:
            return {"role": "assistant", "content": content}
        if self.legacy:
            first = calls[0]
            return {"role": "assistant", "content": content or None,
                    "function_call": {"name": first.name, "arguments": first.arguments}}
        return {"role": "assistant", "content": content or None, "tool_calls": [c.as_openai() for c in calls]}

    def body(self, answer: Collected) -> dict:
        call = self.call
        choices = []
        for choice in answer.choices:
            content, calls = read_answer(choice.text) if self.tools else (choice.text, [])
            reason = self._finish_reason(calls, choice.finish_reason)
            if choice.index == 0:
                call.outcome.finish_reason = reason  # the request log and metrics say what the client saw
            choices.append({"index": choice.index, "message": self._message(content, calls),
                            "logprobs": self.logprobs(choice.logprobs), "finish_reason": reason})
        return {"id": call.completion_id, "object": "chat.completion", "created": call.created,
                "model": call.route.model, "choices": choices, "usage": answer.usage}

    def _choice(self, index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None):
        return self.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def opening(self, index: int) -> dict:
        return self._choice(index, {"role": "assistant", "content": ""})

    def _delta(self, event: tuple) -> dict:
        kind = event[0]
        if kind == "content":
            return {"content": event[1]}
        if kind == "call":
            call: ToolCall = event[2]
            if self.legacy:
                return {"function_call": {"name": call.name, "arguments": ""}}
            return {"tool_calls": [{"index": event[1], "id": call.id, "type": "function",
                                    "function": {"name": call.name, "arguments": ""}}]}
        if self.legacy:
            return {"function_call": {"arguments": event[2]}}
        return {"tool_calls": [{"index": event[1], "function": {"arguments": event[2]}}]}

    def _chunks(self, index: int, events: list[tuple], entries: list[TokenLogprob] | None) -> list[dict]:
        held = self._logprobs.setdefault(index, [])
        held += entries or []
        if self.legacy:  # the legacy answer holds one call: later ones are not sent
            events = [e for e in events if e[0] == "content" or e[1] == 0]
        if not events:
            return []
        chunks = [self._choice(index, self._delta(event)) for event in events]
        chunks[0]["choices"][0]["logprobs"] = self.logprobs(held)
        held.clear()
        return chunks

    def piece(self, index: int, out: EngineOutput) -> list[dict] | dict:
        if not self.tools:
            return self._choice(index, {"content": out.text}, logprobs=self.logprobs(out.logprobs))
        reader = self._readers.setdefault(index, CallReader())
        return self._chunks(index, reader.feed(out.text), out.logprobs)

    def finish(self, index: int, reason: str) -> dict:
        return self._choice(index, {}, reason)

    def finish_chunks(self, index: int, reason: str) -> list[dict]:
        if not self.tools:
            return [self.finish(index, reason)]
        reader = self._readers.setdefault(index, CallReader())
        chunks = self._chunks(index, reader.finish(), None)
        reason = self._finish_reason(reader.calls, reason)
        if index == 0:
            self.call.outcome.finish_reason = reason
        return [*chunks, self.finish(index, reason)]


async def chat_completions(req: ChatCompletionRequest, request: Request, state: ServerState):
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true.", param="top_logprobs")
    state.require_ready()
    check_prompt_chars(sum(len(m.text()) for m in req.messages), "messages", state)
    # tokenizing a megabyte prompt takes a noticeable fraction of a second: in a worker thread, so /health and other requests never wait on it
    output = await state.in_text_pool(state.base.formats.for_chat, req)  # checked and compiled: a 400 comes first
    tools = req.tools if output.tools else None
    prompt_ids = await state.in_text_pool(state.base.prompts.render, req.messages, tools)
    call = await submit(req, prompt_ids, last_user_text(req.messages), request, state, "chatcmpl", output=output)
    shape = _ChatShape(call, state, req.include_usage(), output.tools, req.legacy_functions)
    if not req.stream:
        return await complete_response(call, request, state, shape.body)
    return streaming_response(call, state, shape, req.include_usage())
