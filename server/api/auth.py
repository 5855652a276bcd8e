"""Bearer keys, checked from the headers before anything reads the request body.

Admin keys guard the registry (/v1/adapters, /v1/router/corrections, /v1/fine_tuning) and, if configured, /metrics; optional user keys
guard inference (every other /v1 path, /tokenize and /detokenize; an admin key works there too).
/v1/files is shared: batch input files (purpose "batch") and batch results are the API key's, so batch
users upload with the key they call inference with, while training files (purpose "fine-tune") need an
admin key; the purpose is in the body, so files.py asks `training_files_refusal` once it has read it. The check is ASGI
middleware outside the body-size limit, so a request without the right key costs a header
read: an unauthenticated 200 MB upload is refused before its first byte is buffered.
"""
from __future__ import annotations

import hmac

from server.api.errors import send_error
from server.settings import Settings

ADMIN_PREFIX = "/v1/adapters"
# the router's training data is the registry's too; vLLM's adapter endpoints are registry calls
ADMIN_PATHS = ("/v1/router/corrections", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
ADMIN_PREFIXES = ("/v1/fine_tuning",)  # training makes experts: the registry's business
TRAINING_AREA = "Training files and fine-tuning jobs"
USER_PATHS = ("/tokenize", "/detokenize")  # vLLM's, outside /v1: guarded like inference


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    header = headers.get(b"authorization", b"").decode("latin-1")
    scheme, _, token = header.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def _matches(token: str | None, keys: list[str]) -> bool:
    if token is None:
        return False
    # compare against every key, in constant time each, so timing says nothing about which
    found = False
    for key in keys:
        found |= hmac.compare_digest(token.encode(), key.encode())
    return found


def _is_admin_path(path: str, settings: Settings) -> bool:
    if path == ADMIN_PREFIX or path.startswith(ADMIN_PREFIX + "/") or path in ADMIN_PATHS:
        return True
    if any(path == prefix or path.startswith(prefix + "/") for prefix in ADMIN_PREFIXES):
        return True
    return path == "/metrics" and settings.metrics_require_admin


def _admin_area(path: str) -> str:
    """What an admin path is for, in the words of the user who asked for it."""
    if path.startswith(ADMIN_PREFIXES):
        return TRAINING_AREA
    if path == "/metrics":
        return "Metrics (metrics_require_admin)"
    if path == "/v1/router/corrections":
        return "Router corrections"
    return "Registering and retiring experts"


def refusal(path: str, headers: dict[bytes, bytes], settings: Settings) -> tuple[int, str, str] | None:
    """(status, message, code) when this request may not go on; None when it may."""
    token = _bearer(headers)
    if _is_admin_path(path, settings):
        return _admin_refusal(token, settings, _admin_area(path))
    if (path.startswith("/v1/") or path in USER_PATHS) and settings.api_key and not _matches(token, settings.api_key + settings.admin_key):
        return 401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", "invalid_api_key"
    return None


def _admin_refusal(token: str | None, settings: Settings, area: str) -> tuple[int, str, str] | None:
    if not settings.admin_key:
        return (403, f"{area} over HTTP need an admin key, and this server has none. Set "
                     "LORAPLEX_ADMIN_KEY (or admin_key in the config) and send it as "
                     "'Authorization: Bearer <key>'.", "admin_disabled")
    if not _matches(token, settings.admin_key):
        return 401, "Missing or wrong admin key: send 'Authorization: Bearer <admin key>'.", "invalid_api_key"
    return None


def training_files_refusal(headers: dict[bytes, bytes], settings: Settings) -> tuple[int, str, str] | None:
    """(status, message, code) when this request may not touch training files (an admin key's); None when it may."""
    return _admin_refusal(_bearer(headers), settings, TRAINING_AREA)


class AuthMiddleware:
    def __init__(self, app, settings: Settings):
        self.app = app
        self.settings = settings

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refused = refusal(scope["path"], dict(scope["headers"]), self.settings)
            if refused is not None:
                status, message, code = refused
                headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
                return await send_error(send, status, message, code=code, headers=headers)
        await self.app(scope, receive, send)
