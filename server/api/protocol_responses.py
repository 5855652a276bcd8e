"""The Responses API's request (POST /v1/responses), validated at the HTTP edge, and its input items
normalized to three kinds: messages, function calls and function call outputs.

What this server cannot do is refused by name (a 400 naming the field or the item), never ignored:
built-in tools (web search, file search, computer use, code interpreter, MCP, image generation),
reasoning items and settings, images and files in content, background mode, stored prompts and
conversations, `truncation: auto`.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from server.api.protocol import SEED_MAX, SEED_MIN, STRICT
from validation.schema import EncodableText

# item types the Responses API has that this server does not produce or read
_UNSERVED_ITEMS = {
    "reasoning": "reasoning items (this server's models do not reason in a separate channel)",
    "item_reference": "item references (send the items themselves, or previous_response_id)",
}
_TEXT_PARTS = ("input_text", "output_text", "text", "refusal")


class ItemError(ValueError):
    """An input item this server cannot read: `param` names it (input[3].content[0].type)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param, self.message = param, message


def _text_of(content: Any, param: str) -> str:
    """A message's content as text: a string, or text parts (input_text, output_text, refusal)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ItemError(param, "content must be a string or a list of content parts")
    texts = []
    for index, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind not in _TEXT_PARTS:
            raise ItemError(f"{param}[{index}].type", f"content parts of type {str(kind)[:40]!r} are not supported: "
                                                      "this server takes text parts (input_text, output_text) only")
        text = part.get("refusal") if kind == "refusal" else part.get("text")
        if not isinstance(text, str):
            raise ItemError(f"{param}[{index}].text", f"a {kind} part needs its text as a string")
        texts.append(text)
    return "\n".join(texts)


def _string(item: dict, key: str, param: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise ItemError(f"{param}.{key}", f"{key} must be a string")
    return value


def normalize_item(item: Any, param: str) -> dict:
    """One input item as {"type": "message", "role", "content": text}, {"type": "function_call", "call_id",
    "name", "arguments"} or {"type": "function_call_output", "call_id", "output": text}."""
    if not isinstance(item, dict):
        raise ItemError(param, "an input item must be an object")
    kind = item.get("type", "message" if "role" in item else None)
    if kind == "message":
        role = item.get("role")
        if role not in ("user", "system", "developer", "assistant"):
            raise ItemError(f"{param}.role", f"role must be user, system, developer or assistant, not {role!r}")
        return {"type": "message", "role": role, "content": _text_of(item.get("content"), f"{param}.content")}
    if kind == "function_call":
        arguments = _string(item, "arguments", param)
        return {"type": "function_call", "call_id": _string(item, "call_id", param),
                "name": _string(item, "name", param), "arguments": arguments}
    if kind == "function_call_output":
        output = item.get("output")
        text = output if isinstance(output, str) else _text_of(output, f"{param}.output")
        return {"type": "function_call_output", "call_id": _string(item, "call_id", param), "output": text}
    if kind in _UNSERVED_ITEMS:
        raise ItemError(f"{param}.type", f"{_UNSERVED_ITEMS[kind]} are not supported")
    raise ItemError(f"{param}.type", f"input items of type {str(kind)[:40]!r} are not supported: this server reads "
                                     "messages, function_call and function_call_output items")


class FunctionTool(EncodableText):
    model_config = STRICT

    type: Literal["function"]
    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None


class TextFormat(EncodableText):
    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    name: str | None = Field(None, min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    schema_: dict | None = Field(None, alias="schema")
    description: str | None = None
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "TextFormat":
        if self.type == "json_schema" and (self.schema_ is None or self.name is None):
            raise ValueError("a text.format of type json_schema needs a name and a schema")
        return self


class TextConfig(EncodableText):
    model_config = STRICT

    format: TextFormat | None = None
    verbosity: Literal["low", "medium", "high"] | None = None  # a hint for reasoning models; nothing to do here


class NamedFunction(EncodableText):
    model_config = STRICT

    type: Literal["function"]
    name: str


_BUILT_IN_TOOLS = "web_search, file_search, computer_use, code_interpreter, mcp, image_generation, ..."


class ResponsesRequest(EncodableText):
    """POST /v1/responses. Unknown fields are ignored (clients send many extras); the fields that would
    change the answer in a way this server cannot honour are refused by name."""

    model_config = STRICT

    model: str = Field(min_length=1)
    input: str | list[Any]
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    text: TextConfig | None = None
    tools: list[Any] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | dict | None = None
    parallel_tool_calls: bool | None = None
    stream: bool = False
    store: bool = True  # OpenAI's default: a response is kept (bounded: max_stored_responses)
    previous_response_id: str | None = None
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled", "auto"] | None = None
    include: list[str] | None = None
    reasoning: dict | None = None
    background: bool | None = None
    conversation: str | dict | None = None
    prompt: dict | None = None
    top_logprobs: int | None = None
    # vLLM's and loraplex's extensions, as on chat completions
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)
    router_top_k: int | None = Field(None, ge=1, le=16)

    _function_tools: list[FunctionTool] = []

    @field_validator("input")
    @classmethod
    def _not_empty(cls, value):
        if value == "" or value == []:
            raise ValueError("input is empty")
        return value

    @field_validator("reasoning", "background", "conversation", "prompt", "truncation", "top_logprobs", "include")
    @classmethod
    def _refused(cls, value, info):
        """Fields that would ask for what this server does not do: a 400 naming the field."""
        name = info.field_name
        refused = {
            "reasoning": isinstance(value, dict) and any(v is not None for v in value.values()),
            "background": bool(value), "conversation": value is not None, "prompt": value is not None,
            "truncation": value == "auto", "top_logprobs": bool(value), "include": bool(value),
        }[name]
        if refused:
            raise ValueError({
                "reasoning": "reasoning settings are not supported: this server's models do not reason in a "
                             "separate channel",
                "background": "background mode is not supported: use stream, or the Batch API (/v1/batches)",
                "conversation": "the Conversations API is not served: use previous_response_id",
                "prompt": "stored prompt templates are not served: send instructions and input",
                "truncation": "truncation 'auto' is not supported: a conversation longer than the context window "
                              "is refused (truncation 'disabled')",
                "top_logprobs": "logprobs are not served on the Responses API: use /v1/chat/completions",
                "include": "this server includes nothing extra in a response (asked: "
                           f"{str(value)[:80]})",
            }[name])
        return value

    @field_validator("tools")
    @classmethod
    def _function_tools_only(cls, tools):
        for index, tool in enumerate(tools or ()):
            kind = tool.get("type") if isinstance(tool, dict) else None
            if kind != "function":
                raise ValueError(f"tools[{index}]: built-in tools of type {str(kind)[:40]!r} are not served "
                                 f"({_BUILT_IN_TOOLS}): give tools of type 'function' and run them yourself")
        return tools

    @model_validator(mode="after")
    def _served(self) -> "ResponsesRequest":
        tools = [FunctionTool.model_validate(tool) for tool in self.tools or ()]
        names = [tool.name for tool in tools]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, dict):
            if choice.get("type") != "function":
                raise ValueError(f"tool_choice of type {str(choice.get('type'))[:40]!r} is not supported: use "
                                 "'none', 'auto', 'required' or {'type': 'function', 'name': ...}")
            named = NamedFunction.model_validate(choice)
            if named.name not in names:
                raise ValueError(f"tool_choice names function {named.name!r}, which is not in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        self._function_tools = tools
        return self

    @property
    def function_tools(self) -> list[FunctionTool]:
        return self._function_tools

    def items(self) -> list[dict]:
        """The input as normalized items (a string is one user message); ItemError for what cannot be read."""
        if isinstance(self.input, str):
            return [{"type": "message", "role": "user", "content": self.input}]
        return [normalize_item(item, f"input[{index}]") for index, item in enumerate(self.input)]

