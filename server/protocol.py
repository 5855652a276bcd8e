"""OpenAI request/response shapes, validated at the HTTP edge and nowhere else."""
from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do: clients send many extras.
    model_config = ConfigDict(extra="ignore")

    model: str = Field(min_length=1)
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = Field(None, ge=0, le=20)
    # accepted only when empty / plain text, so a client relying on them hears that they are not served
    tools: list[dict] | None = None
    response_format: dict | None = None
    # vLLM-compatible extensions
    stop_token_ids: list[int] | None = None
    ignore_eos: bool = False

    @field_validator("n")
    @classmethod
    def _only_one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError("only n=1 is supported")
        return n

    @field_validator("logit_bias")
    @classmethod
    def _bias_range(cls, bias: dict[str, float] | None) -> dict[str, float] | None:
        for token, value in (bias or {}).items():
            if not token.isdigit():
                raise ValueError(f"logit_bias keys are token ids (strings of digits), got {token!r}")
            if not -100.0 <= value <= 100.0:
                raise ValueError(f"logit_bias values must be between -100 and 100, got {value} for token {token}")
        return bias

    @field_validator("tools")
    @classmethod
    def _no_tools(cls, tools: list[dict] | None) -> list[dict] | None:
        if tools:
            raise ValueError("tool calling is not supported by this server")
        return tools

    @field_validator("response_format")
    @classmethod
    def _text_only(cls, response_format: dict | None) -> dict | None:
        if response_format and response_format.get("type", "text") != "text":
            raise ValueError("only response_format {'type': 'text'} is supported; for JSON answers use an expert "
                             "trained for it")
        return response_format

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, stop: str | list[str] | None) -> str | list[str] | None:
        stops = [stop] if isinstance(stop, str) else (stop or [])
        if len(stops) > 4:
            raise ValueError("at most 4 stop sequences are allowed")
        if any(s == "" for s in stops):
            raise ValueError("stop sequences must be non-empty strings")
        return stop

    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


class RouteRequest(BaseModel):
    """POST /v1/route: what the router would do with these messages."""

    model_config = ConfigDict(extra="ignore")

    model: str = "auto"
    messages: list[ChatMessage] = Field(min_length=1)
    top_k: int = Field(5, ge=1, le=100)
