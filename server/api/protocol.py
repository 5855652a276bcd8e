"""OpenAI request/response shapes, validated at the HTTP edge and nowhere else."""
from __future__ import annotations

import json
import re
from typing import Annotated, Any, Callable, ClassVar, Literal

from pydantic import (BaseModel, BeforeValidator, ConfigDict, Field, PrivateAttr, ValidationInfo, WithJsonSchema,
                      field_validator, model_validator)

from validation.schema import EncodableText


def _whole_number(value: object) -> object:
    """A list's `limit` as a query writes it: digits ("20"), never "20.0" or "2e1", which pydantic's lax int
    would take as 20 (a fuzzer's type-violating request must get its 400)."""
    if isinstance(value, str) and not re.fullmatch(r"[+-]?[0-9]{1,9}", value):
        raise ValueError("must be a whole number")
    return value


PageLimit = Annotated[int, BeforeValidator(_whole_number)]  # `limit` on the list endpoints


MAX_CHOICES = 16
GUIDED_FIELDS = ("guided_json", "guided_regex", "guided_choice", "guided_grammar")
# Seeds torch.Generator can take: any signed or unsigned 64-bit integer.
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1
# logit_bias keys: token ids written in ASCII digits (str.isdigit also says yes to "²", which int() refuses)
_TOKEN_ID = re.compile(r"[0-9]{1,10}")
# Every request model is strict: "stream": "yes", "n": "2" or "max_tokens": true are type errors
# (400), not silently coerced into something the client may not have meant.
STRICT = ConfigDict(extra="ignore", strict=True)


class TextPart(BaseModel):
    model_config = STRICT

    type: Literal["text"]
    text: str


class FunctionCall(BaseModel):
    model_config = STRICT

    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(BaseModel):
    """A call an assistant turn made (in the history a client sends back)."""

    model_config = STRICT

    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = STRICT

    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[TextPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None  # assistant turns that called tools
    function_call: FunctionCall | None = None  # the legacy form of one call (answered by a "function" turn)
    tool_call_id: str | None = None  # tool turns: which call this answers

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, content):
        """One clear message for image, audio or file parts, instead of the union's three type errors."""
        if isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                if isinstance(kind, str) and kind != "text":
                    raise ValueError(f"content parts of type {kind[:40]!r} are not supported: this server takes "
                                     "text parts only")
        return content

    def calls(self) -> list[FunctionCall]:
        """The calls an assistant turn made, in either form."""
        return [call.function for call in self.tool_calls or []] + ([self.function_call] if self.function_call else [])

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class JsonSchemaSpec(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)

    name: str = Field(min_length=1, max_length=64, pattern=r"^[a-zA-Z0-9_-]+$")
    description: str | None = None
    schema_: dict | None = Field(None, alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """`text`, `json_object` (any JSON object) or `json_schema` (that schema), enforced while decoding."""

    model_config = STRICT

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaSpec | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> "ResponseFormat":
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("response_format of type json_schema needs a json_schema object")
        return self


class FunctionDefinition(BaseModel):
    model_config = STRICT

    name: str = Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")
    description: str | None = None
    parameters: dict | None = None  # JSON Schema of the arguments; none: no arguments
    strict: bool | None = None


class Tool(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: FunctionDefinition


class ToolChoiceFunction(BaseModel):
    model_config = STRICT

    name: str


class NamedToolChoice(BaseModel):
    model_config = STRICT

    type: Literal["function"]
    function: ToolChoiceFunction


def _schema_object(value: dict | str | None, field: str) -> dict | None:
    """A JSON schema given as an object or as JSON text (vLLM takes both)."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except ValueError:
            raise ValueError(f"{field} is not valid JSON") from None
        if not isinstance(value, (dict, bool)):
            raise ValueError(f"{field} must be a JSON schema (an object)")
    return value


class StructuredOutputs(BaseModel):
    """vLLM's `structured_outputs` (its newer spelling of the guided_* fields): one constraint."""

    model_config = ConfigDict(extra="forbid", strict=True)  # an unknown kind of constraint is a 400, never ignored

    json_: dict | str | None = Field(None, alias="json")
    regex: str | None = None
    choice: list[str] | None = Field(None, min_length=1)
    grammar: str | None = None
    json_object: bool | None = None

    @field_validator("json_")
    @classmethod
    def _json_object(cls, value: dict | str | None) -> dict | None:
        return _schema_object(value, "structured_outputs.json")


class StreamOptions(BaseModel):
    model_config = STRICT

    include_usage: bool = False


class SamplingFields(EncodableText):
    """What chat and text completions share: the model, the budget, sampling and stops."""

    # Unknown fields are ignored, as OpenAI-compatible servers do: clients send many extras.
    model_config = STRICT
    PROMPT_PARAM: ClassVar[str] = "prompt"  # where an over-long prompt is reported
    # field -> (does this value ask for something this server does not do?, why): a 400, never silently ignored
    REFUSED: ClassVar[dict[str, tuple[Callable[[Any], bool], str]]] = {}

    model: str = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=SEED_MIN, le=SEED_MAX)
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)  # choices, each generated as its own sequence
    # the sibling keywords document the validators below (they apply to the string / array branch)
    stop: str | list[str] | None = Field(None, json_schema_extra={"minLength": 1, "maxItems": 4,
                                                                  "items": {"type": "string", "minLength": 1}})
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = Field(None, json_schema_extra={
        "propertyNames": {"pattern": "^[0-9]{1,10}$"},
        "additionalProperties": {"type": "number", "minimum": -100, "maximum": 100}})
    # vLLM-compatible extensions
    stop_token_ids: list[int] | None = None
    # vLLM's constraints, enforced by the same grammar library as response_format (structured.py)
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = Field(None, min_length=1)
    guided_grammar: str | None = None
    guided_decoding_backend: str | None = None  # which library vLLM should use; here it is always llguidance
    guided_whitespace_pattern: str | None = None
    structured_outputs: StructuredOutputs | None = None
    # loraplex: with model "auto", blend this many of the top experts (default the server's router_top_k)
    router_top_k: int | None = Field(None, ge=1, le=16)
    ignore_eos: bool = False
    # vLLM's scheduling priority: lower is admitted first and preempted last (batch lines add batch_priority)
    priority: int = Field(0, ge=-(2**31), le=2**31 - 1)

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not _TOKEN_ID.fullmatch(token):
                raise ValueError(f"logit_bias keys are token ids (at most 10 ASCII digits), got {token[:32]!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {value} for token {token}")
        return bias

    @field_validator("guided_json")
    @classmethod
    def _guided_json_object(cls, value: dict | str | None) -> dict | None:
        return _schema_object(value, "guided_json")

    @field_validator("guided_whitespace_pattern")
    @classmethod
    def _no_whitespace_pattern(cls, value: str | None) -> str | None:
        if value is not None:
            raise ValueError("guided_whitespace_pattern is not supported: JSON is always generated compactly, with "
                             "', ' and ': ' as separators")
        return value

    @model_validator(mode="after")
    def _one_guided_constraint(self) -> "SamplingFields":
        given = [name for name in GUIDED_FIELDS if getattr(self, name) is not None]
        if self.structured_outputs is not None:
            given += [f"structured_outputs.{name.rstrip('_')}" for name in StructuredOutputs.model_fields
                      if getattr(self.structured_outputs, name) not in (None, False)]
        if len(given) > 1:
            raise ValueError(f"only one constraint per request: got {', '.join(given)}")
        if self.structured_outputs is not None and not given:
            raise ValueError("structured_outputs names no constraint (json, regex, choice, grammar or json_object)")
        if given and getattr(self, "response_format", None) is not None and self.response_format.type != "text":
            raise ValueError(f"only one constraint per request: got response_format and {given[0]}")
        return self

    def guided(self) -> tuple[str, object, str] | None:
        """The vLLM constraint asked for: (kind, value, the field it came in), or None."""
        for name in GUIDED_FIELDS:
            if getattr(self, name) is not None:
                return name.removeprefix("guided_"), getattr(self, name), name
        outputs = self.structured_outputs
        if outputs is None:
            return None
        for name in ("json_", "regex", "choice", "grammar", "json_object"):
            value = getattr(outputs, name)
            if value not in (None, False):
                return name.rstrip("_"), value, "structured_outputs"
        return None

    @field_validator("*")
    @classmethod
    def _refuse_unserved(cls, value, info: ValidationInfo):
        refused = cls.REFUSED.get(info.field_name)
        if refused is not None and refused[0](value):
            raise ValueError(refused[1])
        return value

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> tuple[int | None, str]:
        """The budget the client asked for, and the name of the field it came in."""
        return self.max_tokens, "max_tokens"

    def logprob_request(self) -> tuple[bool, int]:
        """(whether to report logprobs, how many alternatives per token)."""
        return False, 0

    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(SamplingFields):
    PROMPT_PARAM: ClassVar[str] = "messages"

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None
    # OpenAI's legacy function calling: served as tools, answered as `function_call`
    functions: list[FunctionDefinition] | None = Field(None, max_length=128)
    function_call: Literal["none", "auto"] | ToolChoiceFunction | None = None
    _legacy_functions: bool = PrivateAttr(False)

    @property
    def legacy_functions(self) -> bool:
        """The request used `functions`: the answer says `function_call`, as the legacy API does."""
        return self._legacy_functions

    @model_validator(mode="after")
    def _tools_consistent(self) -> "ChatCompletionRequest":
        if self.functions is not None or self.function_call is not None:
            if self.tools is not None or self.tool_choice is not None:
                raise ValueError("use tools / tool_choice or the legacy functions / function_call, not both")
            if not self.functions:
                raise ValueError("function_call needs functions")
            self.tools = [Tool(type="function", function=function) for function in self.functions]
            call = self.function_call
            self.tool_choice = (NamedToolChoice(type="function", function=call)
                                if isinstance(call, ToolChoiceFunction) else call)
            self.parallel_tool_calls = False
            self._legacy_functions = True
        names = [tool.function.name for tool in self.tools or []]
        if len(set(names)) != len(names):
            raise ValueError("tools: function names must be unique")
        choice = self.tool_choice
        if isinstance(choice, NamedToolChoice) and choice.function.name not in names:
            raise ValueError(f"tool_choice names function {choice.function.name!r}, which is not in tools")
        if choice == "required" and not names:
            raise ValueError("tool_choice 'required' needs tools")
        guided = self.guided()
        if guided and names and choice != "none":
            raise ValueError(f"{guided[2]} and tools cannot both constrain one answer; use response_format with "
                             "tools (the model answers in the format or calls a tool)")
        return self

    def requested_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"

    def logprob_request(self) -> tuple[bool, int]:
        return bool(self.logprobs), self.top_logprobs or 0


class CompletionRequest(SamplingFields):
    """The legacy /v1/completions: a raw prompt, continued as is (no chat template)."""

    # The schema states what the validator below refuses (an empty prompt, several prompts), so that
    # a client generated from the OpenAPI document, or a fuzzer, knows before it sends one; the
    # validator keeps its plain-words errors ("the prompt is empty") rather than pydantic's per-branch ones.
    prompt: Annotated[str | list[int] | list[str] | list[list[int]], WithJsonSchema({"anyOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "items": {"type": "integer"}, "minItems": 1},
        {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1, "maxItems": 1},
        {"type": "array", "items": {"type": "array", "items": {"type": "integer"}, "minItems": 1},
         "minItems": 1, "maxItems": 1}], "title": "Prompt"})]
    echo: bool = False
    logprobs: int | None = Field(None, ge=0, le=20)  # here: how many alternatives; 0 = the chosen token only
    response_format: ResponseFormat | None = None  # an extension (as vLLM's): the continuation in that format
    suffix: str | None = None
    best_of: int | None = None

    @field_validator("prompt")
    @classmethod
    def _one_prompt(cls, prompt):
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ValueError("only one prompt per request is supported; use n for several completions")
        if prompt == "" or prompt == [] or prompt == [""] or prompt == [[]]:
            raise ValueError("the prompt is empty")
        return prompt

    REFUSED = {
        "suffix": (bool, "suffix (insertion) is not supported"),
        "best_of": (lambda best_of: best_of not in (None, 1), "only best_of=1 is supported"),
    }

    def single_prompt(self) -> str | list[int]:
        """The one prompt, as text or as token ids."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            return prompt[0]
        return prompt

    def logprob_request(self) -> tuple[bool, int]:
        return self.logprobs is not None, self.logprobs or 0


class RouteRequest(EncodableText):
    """POST /v1/route: what the router would do with these messages."""

    model_config = STRICT

    model: str = "auto"
    messages: list[ChatMessage] = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=100)
    router_top_k: int | None = Field(None, ge=1, le=16)  # as on completions: "auto" blends this many experts


class TokenizeRequest(EncodableText):
    """vLLM's POST /tokenize: a raw `prompt`, or chat `messages` rendered with the chat template."""

    model_config = STRICT

    model: str | None = None  # any served name: experts and mixtures share the base's tokenizer
    prompt: str | None = None
    messages: list[ChatMessage] | None = Field(None, min_length=1)
    tools: list[Tool] | None = Field(None, max_length=128)
    add_special_tokens: bool | None = None  # default: True for a prompt, False for messages (the template adds them)
    add_generation_prompt: bool = True  # messages: end with the assistant turn's opening
    return_token_strs: bool = False

    @model_validator(mode="after")
    def _one_input(self) -> "TokenizeRequest":
        if (self.prompt is None) == (self.messages is None):
            raise ValueError("give either prompt or messages")
        return self


class DetokenizeRequest(EncodableText):
    """vLLM's POST /detokenize: token ids back to text."""

    model_config = STRICT

    model: str | None = None
    tokens: list[int] = Field(max_length=1_000_000)
