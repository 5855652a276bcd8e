"""Naming rules for experts: registered ones (config, HTTP) and those a source resolves on first use."""
import re

# fullmatch, never match: with match, `$` also matches before a final newline, and a name like
# "ok\n" would be accepted and then break every response header that carries it.
# ':' for fine-tuned models, named as OpenAI names them: ft:<base>:<suffix>:<job id>
ADAPTER_NAME_RE = re.compile(r"[A-Za-z0-9._:-]{1,128}")
MAX_NAME_CHARS = 128


def check_adapter_name(name: str) -> str:
    if not isinstance(name, str) or not ADAPTER_NAME_RE.fullmatch(name) or name in {".", ".."}:
        raise ValueError(
            f"adapter name {name!r} must be 1-128 characters of letters, digits, '.', '_', ':' or '-'"
        )
    return name


def check_source_name(name: str) -> str:
    """A name an adapter source may resolve: registered names, or such names joined by single '/' (a hub's
    `org/adapter`, a bucket's `team/adapter`). The name becomes a path under the source's root, so no
    part may be empty, '.' or '..', and it may not start with '/': it can never leave that root, name an
    absolute path, or carry a URL (':' cannot follow an empty part, so 'scheme://' is refused)."""
    parts = name.split("/") if isinstance(name, str) else []
    if (not parts or len(name) > MAX_NAME_CHARS
            or not all(ADAPTER_NAME_RE.fullmatch(part) and part not in {".", ".."} for part in parts)):
        raise ValueError(f"adapter name {name!r} must be at most {MAX_NAME_CHARS} characters: parts of letters, "
                         "digits, '.', '_', ':' or '-' joined by single '/', none of them '.' or '..'")
    return name
