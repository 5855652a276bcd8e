"""EncodableText: the pydantic base of every request schema and of the settings, whose strings must all
be encodable (validation/unicode.py says why, and holds the check itself)."""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel, model_validator

from validation.unicode import find_unencodable, unencodable_message


class EncodableText(BaseModel):
    """A model whose every string, at any depth, can be encoded as UTF-8 (checked before its fields)."""

    @model_validator(mode="before")
    @classmethod
    def _encodable(cls, data: Any) -> Any:
        location = find_unencodable(data)
        if location is not None:
            raise ValueError(unencodable_message(location))
        return data
