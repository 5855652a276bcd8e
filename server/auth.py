"""Bearer keys: admin keys for the registry, optional user keys for inference."""
from __future__ import annotations

import hmac

from fastapi import Request

from server.errors import APIError


def _bearer(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
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


def require_admin(request: Request) -> None:
    keys = request.app.state.loraplex.settings.admin_key
    if not keys:
        raise APIError(403, "Adapter management over HTTP is disabled. Set LORAPLEX_ADMIN_KEY (or admin_key in the "
                            "config) and send it as 'Authorization: Bearer <key>'.", code="admin_disabled")
    if not _matches(_bearer(request), keys):
        raise APIError(401, "Missing or wrong admin key: send 'Authorization: Bearer <admin key>'.",
                       code="invalid_api_key")


def require_user(request: Request) -> None:
    settings = request.app.state.loraplex.settings
    if settings.api_key and not _matches(_bearer(request), settings.api_key + settings.admin_key):
        raise APIError(401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
