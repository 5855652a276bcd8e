"""Text that can be encoded: the one check every piece of incoming text passes.

JSON and YAML can carry escapes such as "\\ud800" (a lone surrogate) that decode to a Python str but
cannot be written as UTF-8: the tokenizer, the sentence encoder, the manifest and every JSON response
would fail on it later, far from where it came in. So it is refused where it enters (request bodies,
registration metadata, adapter configs, training files, settings) with a message that says where it was.
Standard library only: what needs just the check (adapters/lora.py, hence the GPU kit on a machine
without pydantic) does not import pydantic (schema.py has the pydantic base class).
"""
from __future__ import annotations

from typing import Any


def _bad_character(text: str) -> int | None:
    """Where `text` stops being encodable as UTF-8, or None."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        return exc.start
    return None


def find_unencodable(value: Any) -> str | None:
    """The location of the first string (or dict key) in `value` that is not valid Unicode, else None."""
    stack = [(value, "")]
    while stack:  # iterative: a body nested 100k deep must not exhaust the Python stack
        item, path = stack.pop()
        if isinstance(item, str):
            at = _bad_character(item)
            if at is not None:
                return f"{path or 'text'} (character {at}: {item[at]!r})"
        elif isinstance(item, dict):
            for key, child in item.items():
                if isinstance(key, str) and _bad_character(key) is not None:
                    return f"{path or 'object'} (a key)"
                stack.append((child, f"{path}.{key}" if path else str(key)))
        elif isinstance(item, (list, tuple)):
            stack.extend((child, f"{path}.{index}" if path else str(index)) for index, child in enumerate(item))
    return None


def unencodable_message(location: str) -> str:
    return (f"{location} is not valid Unicode text (a lone surrogate such as \\ud800, or an invalid code point); "
            "send UTF-8 text")
