"""POST /v1/chat/completions: messages -> chat template -> dispatch -> one response or an SSE stream."""
from __future__ import annotations

from fastapi import Request

from server.api.dispatch import Call, check_prompt_chars, submit
from server.api.errors import APIError
from server.api.protocol import ChatCompletionRequest
from server.api.responses import ChunkShaper, Collected, complete_response, streaming_response
from server.api.state import ServerState
from server.engine.sampling import TokenLogprob
from server.engine.sequence import EngineOutput


def last_user_text(messages) -> str:
    """What the router classifies: the newest user turn."""
    return next((m.text() for m in reversed(messages) if m.role == "user"), messages[-1].text())


class _ChatShape(ChunkShaper):
    """chat.completion bodies and chat.completion.chunk events."""

    OBJECT = "chat.completion.chunk"

    def __init__(self, call: Call, state: ServerState, include_usage: bool = False):
        super().__init__(call, include_usage)
        self.pieces = state.base.pieces

    def logprobs(self, entries: list[TokenLogprob] | None) -> dict | None:
        if not self.call.params.logprobs:
            return None
        return {"content": [self.pieces.entry(entry) for entry in entries or []], "refusal": None}

    def body(self, answer: Collected) -> dict:
        call = self.call
        return {
            "id": call.completion_id, "object": "chat.completion", "created": call.created, "model": call.route.model,
            "choices": [{"index": choice.index, "message": {"role": "assistant", "content": choice.text},
                         "logprobs": self.logprobs(choice.logprobs), "finish_reason": choice.finish_reason}
                        for choice in answer.choices],
            "usage": answer.usage,
        }

    def _choice(self, index: int, delta: dict, finish_reason: str | None = None, logprobs: dict | None = None):
        return self.chunk([{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}])

    def opening(self, index: int) -> dict:
        return self._choice(index, {"role": "assistant", "content": ""})

    def piece(self, index: int, out: EngineOutput) -> dict:
        return self._choice(index, {"content": out.text}, logprobs=self.logprobs(out.logprobs))

    def finish(self, index: int, reason: str) -> dict:
        return self._choice(index, {}, reason)


async def chat_completions(req: ChatCompletionRequest, request: Request, state: ServerState):
    if req.top_logprobs and not req.logprobs:
        raise APIError(400, "top_logprobs requires logprobs: true.", param="top_logprobs")
    state.require_ready()
    check_prompt_chars(sum(len(m.text()) for m in req.messages), "messages", state)
    # tokenizing a long prompt takes ~0.4 s per MB: in a worker thread, so /health and other requests never wait on it
    prompt_ids = await state.in_text_pool(state.base.prompts.render, req.messages)
    call = await submit(req, prompt_ids, last_user_text(req.messages), request, state, "chatcmpl")
    if not req.stream:
        return await complete_response(call, request, state, _ChatShape(call, state).body)
    return streaming_response(call, state, _ChatShape(call, state, req.include_usage()), req.include_usage())
