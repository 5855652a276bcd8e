"""Bearer keys, checked from the headers before anything reads the request body; who is asking.

Admin keys guard the registry (/v1/adapters, /v1/router/corrections, /v1/fine_tuning) and, if configured,
/metrics; optional user keys
guard inference (every other /v1 path, /tokenize and /detokenize; an admin key works there too).
/v1/files is shared: batch input files (purpose "batch") and batch results are the API key's, so batch
users upload with the key they call inference with, while training files (purpose "fine-tune") need an
admin key; the purpose is in the body, so files.py asks `training_files_refusal` once it has read it. The check is ASGI
middleware outside the body-size limit, so a request without the right key costs a header
read: an unauthenticated 200 MB upload is refused before its first byte is buffered.

With `tenants: true` a tenant's key (server/tenants/store.py) also opens the registry, training files and
jobs, for that tenant's own objects (batch files, batches and stored responses are every key's, each
seeing its own tenant's: files.py, batches.py, responses_api.py); /v1/tenants is the admin's; every /v1 request needs some key. The key
resolves to a Principal (server/tenants/principal.py), put in the ASGI scope for the endpoints and
stores to check ownership with, and a tenant's generation requests pass its limits here (429 with
Retry-After and OpenAI's x-ratelimit-* headers), before the body is read.
"""
from __future__ import annotations

import asyncio
import hmac

from server.api.errors import send_error
from server.api.middleware import outcome_of
from server.settings import Settings
from server.tenants.limits import TenantLimiter
from server.tenants.principal import ANONYMOUS, OPERATOR, Principal
from server.tenants.store import Tenant, TenantStore

ADMIN_PREFIX = "/v1/adapters"
# the router's training data is the registry's too; vLLM's adapter endpoints are registry calls
ADMIN_PATHS = ("/v1/router/corrections", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")
ADMIN_PREFIXES = ("/v1/fine_tuning",)  # training makes experts: the registry's business
TRAINING_AREA = "Training files and fine-tuning jobs"
USER_PATHS = ("/tokenize", "/detokenize")  # vLLM's, outside /v1: guarded like inference
TENANTS_PREFIX = "/v1/tenants"  # creating tenants and keys: the admin's alone
# what a tenant's rate and concurrency limits count: the requests that generate (a batch's lines are charged
# when the batch runs them, not here: see BatchRunner._call)
LIMITED_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")


def settle(limiter: TenantLimiter, store: TenantStore, metrics, tenant: Tenant, outcome) -> None:
    """A tenant's generation request has ended (an HTTP request here, a batch line in batches.py): its
    concurrency slot back, its tokens charged to the token limit, its usage recorded by the model it ran on."""
    limiter.release(tenant.id)
    prompt, completion = outcome.prompt_tokens or 0, outcome.completion_tokens or 0
    limiter.charge_tokens(tenant.id, tenant.limits, prompt + completion)
    if outcome.model is not None:
        store.add_usage(tenant.id, outcome.model, prompt, completion)
    if metrics is not None:
        metrics.tenant_tokens.labels(tenant.name, "prompt").inc(prompt)
        metrics.tenant_tokens.labels(tenant.name, "completion").inc(completion)


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


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def _is_admin_path(path: str, settings: Settings) -> bool:
    if _under(path, ADMIN_PREFIX) or path in ADMIN_PATHS:
        return True
    if any(_under(path, prefix) for prefix in ADMIN_PREFIXES):
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
    if _under(path, TENANTS_PREFIX):
        return "Tenants and their keys"
    return "Registering and retiring experts"


def refusal(path: str, headers: dict[bytes, bytes], settings: Settings) -> tuple[int, str, str] | None:
    """(status, message, code) when this request may not go on; None when it may (without tenants)."""
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


def training_files_refusal(headers: dict[bytes, bytes], settings: Settings,
                           principal: Principal | None = None) -> tuple[int, str, str] | None:
    """(status, message, code) when this request may not touch training files (an admin key's, or with tenants
    on a tenant's key too, for its own); None when it may. `principal`: the caller with tenants on, else None."""
    if settings.tenants and principal is not None:
        return None if (principal.admin or principal.tenant) else (
            403, f"{TRAINING_AREA} need the admin key or a tenant's key.", "admin_required")
    return _admin_refusal(_bearer(headers), settings, TRAINING_AREA)


WRONG_KEY = (401, "Missing or wrong API key: send 'Authorization: Bearer <key>'.", "invalid_api_key")


class TenantAuth:
    """Who a request is, with tenants on: (Principal, the tenant or None), or a refusal."""

    def __init__(self, settings: Settings, store: TenantStore):
        self.settings, self.store = settings, store

    def principal(self, token: str | None) -> tuple[Principal, Tenant | None] | None:
        """The caller of a key (None: no valid key). May run scrypt once per key: see TenantStore.authenticate."""
        if token is None:
            return None
        if _matches(token, self.settings.admin_key):
            return OPERATOR, None
        holder = self.store.authenticate(token)
        if holder is not None:
            return Principal(tenant=holder.tenant.id, key_id=holder.key_id), holder.tenant
        if _matches(token, self.settings.api_key):
            return ANONYMOUS, None
        return None

    def refusal(self, path: str, principal: Principal | None) -> tuple[int, str, str] | None:
        if principal is None:
            if path.startswith("/v1/") or path in USER_PATHS or (
                    path == "/metrics" and self.settings.metrics_require_admin):
                return WRONG_KEY
            return None
        if _under(path, TENANTS_PREFIX) or (path == "/metrics" and self.settings.metrics_require_admin):
            return None if principal.admin else (
                403, f"{_admin_area(path)} need the admin key.", "admin_required")
        if _is_admin_path(path, self.settings) and not (principal.admin or principal.tenant):
            return 403, f"{_admin_area(path)} need the admin key or a tenant's key.", "admin_required"
        return None


class AuthMiddleware:
    def __init__(self, app, settings: Settings, tenants: TenantStore | None = None,
                 limiter: TenantLimiter | None = None, metrics=None):
        self.app = app
        self.settings = settings
        self.tenants = TenantAuth(settings, tenants) if tenants is not None else None
        self.limiter = limiter or TenantLimiter()
        self.metrics = metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if self.tenants is None:
            refused = refusal(scope["path"], headers, self.settings)
            if refused is None:
                admin = _matches(_bearer(headers), self.settings.admin_key)
                scope.setdefault("state", {})["principal"] = OPERATOR if admin else ANONYMOUS
                return await self.app(scope, receive, send)
            return await self._refuse(send, refused)
        token = _bearer(headers)
        if token is not None and self.tenants.store.needs_slow_check(token):
            found = await asyncio.to_thread(self.tenants.principal, token)  # scrypt: once per key, off the loop
        else:
            found = self.tenants.principal(token)
        principal, tenant = found if found is not None else (None, None)
        refused = self.tenants.refusal(scope["path"], principal)
        if refused is not None:
            return await self._refuse(send, refused)
        scope.setdefault("state", {})["principal"] = principal
        if tenant is None or scope["path"] not in LIMITED_PATHS:
            return await self.app(scope, receive, send)
        await self._limited(scope, receive, send, tenant)

    async def _limited(self, scope, receive, send, tenant: Tenant):
        """A tenant's generation request: its limits checked and its headers sent; tokens charged, usage
        recorded and its concurrency slot given back when it ends."""
        verdict = self.limiter.admit(tenant.id, tenant.limits)
        if verdict.refused is not None:
            if self.metrics is not None:
                self.metrics.tenant_refusals.labels(tenant.name).inc()
            headers = {k.decode(): v.decode() for k, v in verdict.headers}
            headers["Retry-After"] = str(verdict.retry_after)
            return await send_error(send, 429, verdict.refused, code="rate_limit_exceeded", headers=headers)

        async def send_with_limits(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message.get("headers", []), *verdict.headers]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_limits)
        finally:
            settle(self.limiter, self.tenants.store, self.metrics, tenant, outcome_of(scope))

    @staticmethod
    async def _refuse(send, refused):
        status, message, code = refused
        headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
        return await send_error(send, status, message, code=code, headers=headers)
