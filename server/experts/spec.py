"""What registering an expert says: an AdapterSpec (the config's expert entry) plus its name, and where
its weights come from (a path under the adapter roots, or a mixture of registered experts; an upload
brings its files beside it)."""
from __future__ import annotations

from server.settings import AdapterSpec


class ExpertRegistration(AdapterSpec):
    """POST /v1/adapters; also a fine-tuning job's result. `path` only for registration by path."""

    name: str
    path: str | None = None
    # a mixture of registered experts, served under `name` like any expert: {"pirate": 0.7, "terse": 0.3}
    mixture: dict[str, float] | None = None
