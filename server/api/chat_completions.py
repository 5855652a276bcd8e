"""POST /v1/chat/completions: messages -> chat template -> dispatch -> one response or an SSE stream."""
from __future__ import annotations

from fastapi import Request

from server.api.dispatch import Call, check_prompt_chars, submit
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest
from server.api.responses import ChunkShaper, Collected, complete_response, streaming_response
from server.api.state import ServerState
from server.api.structured import CALL_OPEN, parse_tool_calls
from server.engine.sampling import TokenLogprob
from server.engine.sequence import EngineOutput


def last_user_text(messages) -> str:
    """What the router classifies: the newest user turn."""
    return next((m.text() for m in reversed(messages) if m.role == "user"), messages[-1].text())


class _ChatShape(ChunkShaper):
    """chat.completion bodies and chat.completion.chunk events."""

    OBJECT = "chat.completion.chunk"

    def __init__(self, call: Call, state: ServerState, include_usage: bool = False, tools: bool = False):
        super().__init__(call, include_usage)
        self.pieces = state.base.pieces
        # the answer may be tool calls: a stream holds text back until it cannot be a call's opening
        self.tools = tools
        self._held: dict[int, str] = {}
        self._free_text: set[int] = set()  # choices known to be plain text

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if not self.call.params.logprobs:
            return None
        return {"content": [self.pieces.entry(entry) for entry in entries or []], "refusal": None}

    def _calls(self, text: str, reason: str | None) -> list[dict] | None:
        return parse_tool_calls(text) if self.tools and reason == "stop" else None

    def body(self, answer: Collected) -> dict:
        call = self.call
        choices = []
        for choice in answer.choices:
            calls = self._calls(choice.text, choice.finish_reason)
            if calls and choice.index == 0:
                call.outcome.finish_reason = "tool_calls"  # the request log and metrics say what the client saw
            message = ({"role": "assistant", "content": None, "tool_calls": calls} if calls
                       else {"role": "assistant", "content": choice.text})
            choices.append({"index": choice.index, "message": message, "logprobs": self.logprobs(choice.logprobs),
                            "finish_reason": "tool_calls" if calls else choice.finish_reason})
        return {"id": call.completion_id, "object": "chat.completion", "created": call.created,
                "model": call.route.model, "choices": choices, "usage": answer.usage}

    def _choice(self, index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None):
        return self.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def opening(self, index: int) -> dict:
        return self._choice(index, {"role": "assistant", "content": ""})

    def piece(self, index: int, out: EngineOutput) -> dict | None:
        if not self.tools or index in self._free_text:
            return self._choice(index, {"content": out.text}, logprobs=self.logprobs(out.logprobs))
        held = self._held.get(index, "") + out.text
        start = held.lstrip()
        if not start or start.startswith(CALL_OPEN) or CALL_OPEN.startswith(start):
            self._held[index] = held  # a call, or maybe its opening: wait
            return None
        self._free_text.add(index)  # plain text after all: send what was held
        self._held.pop(index, None)
        return self._choice(index, {"content": held}, logprobs=self.logprobs(out.logprobs))

    def finish(self, index: int, reason: str) -> dict:
        return self._choice(index, {}, reason)

    def finish_chunks(self, index: int, reason: str) -> list[dict]:
        held = self._held.pop(index, "")
        calls = self._calls(held, reason)
        if calls:  # OpenAI's shape: each call's id, name and arguments in a delta, then finish_reason tool_calls
            if index == 0:
                self.call.outcome.finish_reason = "tool_calls"
            deltas = [{"index": i, **call} for i, call in enumerate(calls)]
            return [self._choice(index, {"tool_calls": deltas}), self.finish(index, "tool_calls")]
        chunks = [self._choice(index, {"content": held})] if held else []
        return [*chunks, self.finish(index, reason)]


async def chat_completions(req: ChatCompletionRequest, request: Request, state: ServerState):
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true.", param="top_logprobs")
    state.require_ready()
    check_prompt_chars(sum(len(m.text()) for m in req.messages), "messages", state)
    # tokenizing a long prompt takes ~0.4 s per MB: in a worker thread, so /health and other requests never wait on it
    output = await state.in_text_pool(state.base.formats.for_chat, req)  # checked and compiled: a 400 comes first
    tools = req.tools if output.tools else None
    prompt_ids = await state.in_text_pool(state.base.prompts.render, req.messages, tools)
    call = await submit(req, prompt_ids, last_user_text(req.messages), request, state, "chatcmpl", output=output)
    if not req.stream:
        return await complete_response(call, request, state, _ChatShape(call, state, tools=output.tools).body)
    return streaming_response(call, state, _ChatShape(call, state, req.include_usage(), output.tools),
                              req.include_usage())
