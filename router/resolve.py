"""Decision order for which expert serves a request: X-Expert header, then `model`."""
from __future__ import annotations

from dataclasses import dataclass

from adapters.registry import AdapterRegistry
from server.errors import APIError

AUTO_MODEL = "auto"


@dataclass(frozen=True)
class Route:
    adapter: str | None  # None: the base model, no LoRA
    expert: str  # what the X-Expert response header says: the adapter or the base name
    source: str  # header | model | base | fallback


def resolve_expert(model: str, expert_header: str | None, registry: AdapterRegistry, base_name: str) -> Route:
    if expert_header:
        return _by_name(expert_header, registry, base_name, source="header", param="X-Expert")
    if model == AUTO_MODEL:
        # No classifier yet: "auto" falls back to the base, and says so in the headers.
        return Route(None, base_name, "fallback")
    return _by_name(model, registry, base_name, source="model", param="model")


def _by_name(name: str, registry: AdapterRegistry, base_name: str, source: str, param: str) -> Route:
    if name == base_name:
        return Route(None, base_name, "base")
    if registry.get(name) is not None:
        return Route(name, name, source)
    raise APIError(
        404,
        f"The model or expert '{name}' does not exist. GET /v1/models lists the base and the registered experts.",
        param=param,
        code="model_not_found",
    )
