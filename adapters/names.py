"""Naming rule for experts, shared by config loading and (later) HTTP registration."""
import re

ADAPTER_NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def check_adapter_name(name: str) -> str:
    if not ADAPTER_NAME_RE.match(name) or name in {".", ".."}:
        raise ValueError(
            f"adapter name {name!r} must be 1-64 characters of letters, digits, '.', '_' or '-'"
        )
    return name
