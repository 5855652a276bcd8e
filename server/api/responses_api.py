"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

What the OpenAI Agents SDK calls by default (and pydantic-ai, LangChain, LiteLLM can). A request is
turned into the chat request it means (instructions as the system turn, input items as turns, function
calls and their outputs as tool calls and tool turns, text.format as response_format, function tools
as tools) and goes the chat path from there: the same chat template, the same grammars for JSON and
tool calls (structured.py), the same routing to the base, an expert, a mixture or `auto`. Only the
answer's shape differs: output items (a message, function calls), and when streamed the semantic events
clients parse (response.created, response.output_item.added, response.output_text.delta,
response.function_call_arguments.delta, ..., response.completed; an engine failure is an `error` event
then response.failed).

`store` (default true, as OpenAI's) keeps the response with the conversation it answered
(server/jobs/response_store.py, bounded), so `previous_response_id` continues it without the client
sending the history again; instructions are not carried over, as OpenAI documents.
With tenants on, a stored response is its creator's tenant's (server/tenants/principal.py): another
tenant's answers GET, DELETE and previous_response_id exactly as an absent one; the request itself routes
through dispatch.submit, so it uses only the experts the caller may use.
"""
from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError

from server.api.chat_completions import last_user_text
from server.api.dispatch import Call, check_prompt_chars, submit
from server.api.errors import APIError, validation_message
from server.api.listing import list_page
from server.api.protocol import ChatCompletionRequest, PageLimit
from server.api.protocol_responses import ItemError, ResponsesRequest
from server.api.responses import collect, engine_failed, route_headers, stream
from server.api.state import ServerState
from server.api.tool_calls import CallReader, ToolCall, read_answer
from server.jobs.response_store import new_response_id
from server.tenants.principal import SHARED, Principal, principal_of

router = APIRouter()


def _chat_messages(instructions: str | None, items: list[dict]) -> list[dict]:
    """Normalized items as chat turns: consecutive function calls join the assistant turn before them."""
    messages = [{"role": "system", "content": instructions}] if instructions else []
    for item in items:
        kind = item["type"]
        if kind == "message":
            messages.append({"role": item["role"], "content": item["content"]})
        elif kind == "function_call":
            call = {"id": item["call_id"], "type": "function",
                    "function": {"name": item["name"], "arguments": item["arguments"]}}
            last = messages[-1] if messages else None
            if last is not None and last["role"] == "assistant":
                last.setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": None, "tool_calls": [call]})
        else:
            messages.append({"role": "tool", "content": item["output"], "tool_call_id": item["call_id"]})
    return messages


def _response_format(body: ResponsesRequest) -> dict | None:
    fmt = body.text.format if body.text else None
    if fmt is None or fmt.type != "json_schema":
        return None if fmt is None else {"type": fmt.type}
    return {"type": "json_schema", "json_schema": {"name": fmt.name, "schema": fmt.schema_,
                                                   "description": fmt.description, "strict": fmt.strict}}


def as_chat(body: ResponsesRequest, conversation: list[dict]) -> ChatCompletionRequest:
    """The chat request a Responses request means (validated as one: the same 400s as chat)."""
    choice = body.tool_choice
    if isinstance(choice, dict):
        choice = {"type": "function", "function": {"name": choice["name"]}}
    tools = [{"type": "function", "function": tool.model_dump(exclude={"type"}, exclude_none=True)}
             for tool in body.function_tools]
    chat = {"model": body.model, "messages": _chat_messages(body.instructions, conversation),
            "max_completion_tokens": body.max_output_tokens, "temperature": body.temperature, "top_p": body.top_p,
            "tools": tools or None, "tool_choice": choice, "parallel_tool_calls": body.parallel_tool_calls,
            "response_format": _response_format(body), "seed": body.seed, "priority": body.priority,
            "router_top_k": body.router_top_k}
    if not chat["messages"]:
        raise APIError(400, "The conversation is empty: give input (or instructions).", param="input")
    try:
        return ChatCompletionRequest.model_validate({k: v for k, v in chat.items() if v is not None})
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param=param) from None


def _usage(usage: dict | None) -> dict | None:
    if usage is None:
        return None
    return {"input_tokens": usage["prompt_tokens"],
            "input_tokens_details": {"cached_tokens": usage["prompt_tokens_details"]["cached_tokens"]},
            "output_tokens": usage["completion_tokens"], "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": usage["total_tokens"]}


def _message_item(item_id: str, text: str, status: str) -> dict:
    return {"type": "message", "id": item_id, "status": status, "role": "assistant",
            "content": [{"type": "output_text", "text": text, "annotations": [], "logprobs": []}]}


def _call_item(item_id: str, call: ToolCall, status: str) -> dict:
    return {"type": "function_call", "id": item_id, "call_id": call.id, "name": call.name,
            "arguments": call.arguments, "status": status}


class Turn:
    """One response being made: its id, what it was asked, and (as it ends) its output and usage."""

    def __init__(self, body: ResponsesRequest, conversation: list[dict], chat: ChatCompletionRequest,
                 state: ServerState):
        self.id = new_response_id()
        self.created = int(time.time())
        self.body, self.conversation, self.chat, self.state = body, conversation, chat, state
        self.model = body.model
        self.owner = SHARED  # who may read it back: the creator's tenant (create_response sets it)

    def obj(self, status: str, output: list[dict], usage: dict | None = None, error: dict | None = None,
            finish_reason: str | None = None) -> dict:
        """The response object in OpenAI's shape."""
        body = self.body
        fmt = body.text.format.model_dump(by_alias=True, exclude_none=True) if body.text and body.text.format \
            else {"type": "text"}
        choice = body.tool_choice if body.tool_choice is not None else ("auto" if body.function_tools else "none")
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "background": False, "error": error,
            "incomplete_details": {"reason": "max_output_tokens"} if finish_reason == "length" else None,
            "instructions": body.instructions, "max_output_tokens": body.max_output_tokens,
            "model": self.model, "output": output, "parallel_tool_calls": bool(body.parallel_tool_calls),
            "previous_response_id": body.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": body.store, "temperature": body.temperature if body.temperature is not None else 1.0,
            "text": {"format": fmt}, "tool_choice": choice,
            "tools": [tool.model_dump() for tool in body.function_tools],
            "top_p": body.top_p if body.top_p is not None else 1.0, "truncation": "disabled",
            "usage": usage, "user": body.user, "metadata": body.metadata or {},
        }

    async def keep(self, response: dict) -> None:
        """Store the finished response (store: true) with the conversation it continues."""
        if not self.body.store:
            return
        output = []
        for item in response["output"]:
            if item["type"] == "message":
                output.append({"type": "message", "role": "assistant", "content": item["content"][0]["text"]})
            else:
                output.append({"type": "function_call", "call_id": item["call_id"], "name": item["name"],
                               "arguments": item["arguments"]})
        document = {"response": response, "input": self.conversation, "output": output,
                    "_owner": self.owner}  # the creator's tenant: only its keys see it (principal.py)
        await asyncio.to_thread(self.state.responses.put, self.id, document)


async def _conversation(body: ResponsesRequest, state: ServerState, principal: Principal) -> list[dict]:
    try:
        items = body.items()
    except ItemError as exc:
        raise APIError(400, exc.message, param=exc.param) from None
    if body.previous_response_id is None:
        return items
    previous = _visible(await asyncio.to_thread(state.responses.get, body.previous_response_id), principal)
    if previous is None:
        raise APIError(400, f"Previous response with id '{body.previous_response_id}' not found (it was never "
                            "stored, was deleted, or was evicted: max_stored_responses).",
                       param="previous_response_id", code="previous_response_not_found")
    return previous["input"] + previous["output"] + items


async def create_response(body: ResponsesRequest, request: Request, state: ServerState):
    state.require_ready()
    principal = principal_of(request.scope)
    conversation = await _conversation(body, state, principal)
    chat = as_chat(body, conversation)
    check_prompt_chars(sum(len(m.text()) for m in chat.messages), "input", state)
    output = await state.in_text_pool(state.base.formats.for_chat, chat)
    tools = chat.tools if output.tools else None
    prompt_ids = await state.in_text_pool(state.base.prompts.render, chat.messages, tools)
    call = await submit(chat, prompt_ids, last_user_text(chat.messages), request, state, "resp", output=output)
    turn = Turn(body, conversation, chat, state)
    turn.owner = principal.owner
    turn.model = call.route.model
    if body.stream:
        return StreamingResponse(_events(turn, call, output.tools), media_type="text/event-stream",
                                 headers={**route_headers(call.route, call.replica), "Cache-Control": "no-cache"})
    answer = await collect(call, request, state)
    if answer is None:
        return JSONResponse({}, status_code=499)  # nobody is listening any more
    choice = answer.choices[0]
    content, calls = read_answer(choice.text) if output.tools else (choice.text, [])
    status = "incomplete" if choice.finish_reason == "length" else "completed"
    items = []
    if content or not calls:
        items.append(_message_item(new_response_id("msg"), content, status))
    items += [_call_item(new_response_id("fc"), c, "completed" if c.complete else "incomplete") for c in calls]
    response = turn.obj(status, items, _usage(answer.usage), finish_reason=choice.finish_reason)
    await turn.keep(response)
    return JSONResponse(response, headers=route_headers(call.route, call.replica))


class _EventWriter:
    """SSE events of the Responses stream: `event: <type>` and its data, numbered in order."""

    def __init__(self):
        self.number = 0

    def __call__(self, kind: str, **fields) -> bytes:
        data = json.dumps({"type": kind, "sequence_number": self.number, **fields}, ensure_ascii=False)
        self.number += 1
        return f"event: {kind}\ndata: {data}\n\n".encode()


async def _events(turn: Turn, call: Call, tools: bool) -> AsyncIterator[bytes]:
    """The stream: created, in_progress, each output item opened, its deltas, closed, then completed."""
    event = _EventWriter()
    yield event("response.created", response=turn.obj("in_progress", []))
    yield event("response.in_progress", response=turn.obj("in_progress", []))
    items: list[dict] = []  # output items so far, in output order
    open_message: dict | None = None
    open_calls: dict[int, dict] = {}  # the reader's call index -> its item
    reader = CallReader() if tools else None

    def close_message(status: str) -> list[bytes]:
        nonlocal open_message
        if open_message is None:
            return []
        item, index, text = open_message, items.index(open_message), open_message["content"][0]["text"]
        item["status"] = status
        part = item["content"][0]
        open_message = None
        return [event("response.output_text.done", item_id=item["id"], output_index=index, content_index=0,
                      text=text, logprobs=[]),
                event("response.content_part.done", item_id=item["id"], output_index=index, content_index=0,
                      part=part),
                event("response.output_item.done", output_index=index, item=item)]

    def handle(piece: tuple) -> list[bytes]:
        nonlocal open_message
        kind, out = piece[0], []
        if kind == "content":
            if open_message is None:
                open_message = _message_item(new_response_id("msg"), "", "in_progress")
                items.append(open_message)
                index = len(items) - 1
                out += [event("response.output_item.added", output_index=index,
                              item={**open_message, "content": []}),
                        event("response.content_part.added", item_id=open_message["id"], output_index=index,
                              content_index=0, part={"type": "output_text", "text": "", "annotations": [],
                                                     "logprobs": []})]
            open_message["content"][0]["text"] += piece[1]
            out.append(event("response.output_text.delta", item_id=open_message["id"],
                             output_index=items.index(open_message), content_index=0, delta=piece[1], logprobs=[]))
        elif kind == "call":
            out += close_message("completed")
            item = {**_call_item(new_response_id("fc"), piece[2], "in_progress"), "arguments": ""}
            items.append(item)
            open_calls[piece[1]] = item
            out.append(event("response.output_item.added", output_index=len(items) - 1, item=item))
        else:  # arguments
            item = open_calls[piece[1]]
            item["arguments"] += piece[2]
            out.append(event("response.function_call_arguments.delta", item_id=item["id"],
                             output_index=items.index(item), delta=piece[2]))
        return out

    async with aclosing(stream(call, turn.state)) as outputs:
        async for _, out, usage in outputs:
            if out.error:
                error = engine_failed(out)
                yield event("error", code=error.code, message=error.message, param=None)
                failed = turn.obj("failed", items, error={"code": error.code or "server_error",
                                                          "message": error.message})
                yield event("response.failed", response=failed)
                return
            if out.finish_reason == "abort":  # stream() ends an open choice so before its error: the error follows
                continue
            if out.text:
                for piece in reader.feed(out.text) if reader else [("content", out.text)]:
                    for chunk in handle(piece):
                        yield chunk
            if not out.finish_reason:
                continue
            for piece in reader.finish() if reader else []:
                for chunk in handle(piece):
                    yield chunk
            status = "incomplete" if out.finish_reason == "length" else "completed"
            if not items:  # an empty answer is still one (empty) message, as unstreamed
                for chunk in handle(("content", "")):
                    yield chunk
            for chunk in close_message(status):
                yield chunk
            for reader_index, item in open_calls.items():
                complete = reader.calls[reader_index].complete
                item["status"] = "completed" if complete else "incomplete"
                index = items.index(item)
                yield event("response.function_call_arguments.done", item_id=item["id"], output_index=index,
                            name=item["name"], arguments=item["arguments"])
                yield event("response.output_item.done", output_index=index, item=item)
            final = turn.obj(status, items, _usage(usage), finish_reason=out.finish_reason)
            await turn.keep(final)
            yield event("response.completed" if status == "completed" else "response.incomplete", response=final)


def _ready(request: Request) -> ServerState:
    state = request.app.state.loraplex
    state.require_ready()
    return state


def _visible(document: dict | None, principal: Principal) -> dict | None:
    """A stored response if `principal` may see it: its creator's tenant's keys (and the admin); else None, so
    another tenant's response answers exactly as an absent one (principal.py)."""
    if document is None or not principal.sees(document.get("_owner", SHARED)):
        return None
    return document


def _stored(state: ServerState, response_id: str, document: dict | None, principal: Principal) -> dict:
    document = _visible(document, principal)
    if document is None:
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                       code="response_not_found")
    return document


@router.post("/v1/responses")
async def post_response(body: ResponsesRequest, request: Request):
    return await create_response(body, request, _ready(request))


@router.get("/v1/responses/{response_id}")
async def get_response(response_id: str, request: Request):
    state = _ready(request)
    return _stored(state, response_id, await asyncio.to_thread(state.responses.get, response_id),
                   principal_of(request.scope))["response"]


@router.get("/v1/responses/{response_id}/input_items")
async def get_input_items(response_id: str, request: Request, order: str = "desc", limit: PageLimit = 20):
    """The conversation the response answered, as input items (the chain of earlier responses included)."""
    state = _ready(request)
    document = _stored(state, response_id, await asyncio.to_thread(state.responses.get, response_id),
                       principal_of(request.scope))
    items = []
    for index, item in enumerate(document["input"]):
        item_id = f"item_{response_id.removeprefix('resp_')}_{index}"
        if item["type"] == "message":
            part = "output_text" if item["role"] == "assistant" else "input_text"
            items.append({"type": "message", "id": item_id, "role": item["role"], "status": "completed",
                          "content": [{"type": part, "text": item["content"]}]})
        else:
            items.append({**item, "id": item_id, "status": "completed"} if item["type"] == "function_call"
                         else {**item, "id": item_id})
    if order == "desc":
        items.reverse()
    return list_page(items, limit)


@router.delete("/v1/responses/{response_id}")
async def delete_response(response_id: str, request: Request):
    state = _ready(request)
    _stored(state, response_id, await asyncio.to_thread(state.responses.get, response_id), principal_of(request.scope))
    if not await asyncio.to_thread(state.responses.delete, response_id):
        raise APIError(404, f"Response with id '{response_id}' not found.", param="response_id",
                       code="response_not_found")
    return {"id": response_id, "object": "response", "deleted": True}
