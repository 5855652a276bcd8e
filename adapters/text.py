"""Text that can be encoded: the one check every piece of incoming text passes.

JSON and YAML can carry escapes such as "\\ud800" (a lone surrogate) that decode to a Python
str but cannot be written as UTF-8: the tokenizer, the sentence encoder, the manifest and
every JSON response would fail on it later, far from where it came in. So it is refused where
it enters (request bodies, registration metadata, adapter configs, settings) with a message
that says where it was. It lives here, in the lowest package, because the HTTP edge, the
settings and adapter admission all use it.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

# the check itself (pydantic-free, for adapters/lora.py); imported from here by the HTTP edge and start-up
from adapters.encodable import find_unencodable, unencodable_message  # noqa: F401


class EncodableText(BaseModel):
    """A model whose every string, at any depth, can be encoded as UTF-8 (checked before its fields)."""

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        location = find_unencodable(data)
        if location is not None:
            raise ValueError(unencodable_message(location))
        return data
