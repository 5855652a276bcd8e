"""Server settings: defaults < YAML config file < LORAPLEX_* environment < CLI flags.

Pydantic validates the merged result once, so a bad value anywhere gives one clear
message instead of a traceback from deep inside the engine.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

ENV_PREFIX = "LORAPLEX_"
EMBEDDED_BASE = "embedded:smollm2"


class ConfigError(Exception):
    """A configuration problem worth a one-line message and a non-zero exit."""


class AdapterSpec(BaseModel):
    """An expert to load at start: where its files are plus metadata for routing and stops."""

    model_config = ConfigDict(extra="forbid")

    path: str
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    stop: list[str] = Field(default_factory=list, description="Stop strings this expert always uses.")
    stop_token_ids: list[int] = Field(default_factory=list, description="Extra tokens that end this expert's turn.")

    @field_validator("stop")
    @classmethod
    def _non_empty_stops(cls, stops: list[str]) -> list[str]:
        if any(not s for s in stops):
            raise ValueError("stop strings must be non-empty")
        return stops


class Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    base_model: str = Field(
        EMBEDDED_BASE,
        description="A local Hugging Face Llama folder, or 'embedded:smollm2' for the bundled default.",
    )
    served_model_name: str | None = Field(None, description="Name clients use for the base; defaults to the folder name.")
    quantization: Literal["nf4", "int8", "none"] = "nf4"
    compute_dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    device: str = Field("auto", description="'auto' picks cuda when present, else cpu.")
    max_batch_size: int = Field(16, ge=1, le=1024)
    max_queued_requests: int = Field(256, ge=0)
    default_max_tokens: int = Field(512, ge=1)
    max_tokens_limit: int = Field(2048, ge=1, description="Upper bound on a request's max_tokens.")
    context_window: int = Field(2048, ge=16, description="Prompt plus completion tokens per request.")
    max_request_bytes: int = Field(1_000_000, ge=1024)
    shutdown_timeout_s: float = Field(30.0, ge=0)
    cache_dir: str = Field(
        default_factory=lambda: os.environ.get("LORAPLEX_CACHE", str(Path.home() / ".cache" / "loraplex")),
        description="Where the embedded base is converted to safetensors once.",
    )
    adapters: dict[str, AdapterSpec] = Field(default_factory=dict)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)

    @field_validator("adapters")
    @classmethod
    def _adapter_names_are_safe(cls, adapters: dict[str, AdapterSpec]) -> dict[str, AdapterSpec]:
        from adapters.names import check_adapter_name

        for name in adapters:
            check_adapter_name(name)
        return adapters

    @model_validator(mode="after")
    def _limits_are_consistent(self) -> "Settings":
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError(
                f"default_max_tokens ({self.default_max_tokens}) exceeds max_tokens_limit ({self.max_tokens_limit})"
            )
        return self


def _env_overrides(environ: dict[str, str]) -> dict[str, Any]:
    """LORAPLEX_MAX_BATCH_SIZE=8 -> {"max_batch_size": "8"}; JSON values allowed for dicts/lists."""
    overrides: dict[str, Any] = {}
    for field_name in Settings.model_fields:
        raw = environ.get(ENV_PREFIX + field_name.upper())
        if raw is None:
            continue
        if raw[:1] in "{[":
            try:
                overrides[field_name] = json.loads(raw)
                continue
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{ENV_PREFIX}{field_name.upper()} is not valid JSON: {exc}") from exc
        overrides[field_name] = raw
    return overrides


def _read_yaml(path: str) -> dict[str, Any]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read config file {path}: {exc.strerror}") from exc
    try:
        data = yaml.safe_load(text) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"config file {path} is not valid YAML: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping of settings, not {type(data).__name__}")
    # Relative adapter paths are relative to the config file, so configs are portable.
    base_dir = Path(path).resolve().parent
    for spec in (data.get("adapters") or {}).values():
        if isinstance(spec, dict) and isinstance(spec.get("path"), str) and not os.path.isabs(spec["path"]):
            spec["path"] = str(base_dir / spec["path"])
    return data


def _format_validation_error(exc: ValidationError) -> str:
    lines = []
    for err in exc.errors():
        where = ".".join(str(part) for part in err["loc"]) or "config"
        lines.append(f"  {where}: {err['msg']}")
    return "invalid settings:\n" + "\n".join(lines)


def load_settings(
    config_path: str | None = None,
    cli_overrides: dict[str, Any] | None = None,
    environ: dict[str, str] | None = None,
) -> Settings:
    merged: dict[str, Any] = {}
    if config_path:
        merged.update(_read_yaml(config_path))
    merged.update(_env_overrides(dict(os.environ) if environ is None else environ))
    merged.update({k: v for k, v in (cli_overrides or {}).items() if v is not None})
    try:
        return Settings(**merged)
    except ValidationError as exc:
        raise ConfigError(_format_validation_error(exc)) from exc
