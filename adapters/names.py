"""Naming rule for experts, shared by config loading and HTTP registration."""
import re

# fullmatch, never match: with match, `$` also matches before a final newline, and a name like
# "ok\n" would be accepted and then break every response header that carries it.
# ':' for fine-tuned models, named as OpenAI names them: ft:<base>:<suffix>:<job id>
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise ValueError(
            f"adapter name {name!r} must be 1-128 characters of letters, digits, '.', '_', ':' or '-'"
        )
    return name
