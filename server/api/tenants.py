"""/v1/tenants (admin key): tenants, their limits and keys; /v1/usage: tokens per tenant, expert and day.

Served with `tenants: true` only. A key is shown once, in the answer that issues it (create or rotate);
the database keeps its salted hash (server/tenants/store.py). The same operations are on the command line
(`loraplex tenants ...`), against the same database, also while the server runs.
"""
from __future__ import annotations

import asyncio
import re

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from validation.schema import EncodableText
from server.api.errors import APIError
from server.api.state import ServerState
from server.tenants.principal import principal_of
from server.tenants.store import Limits

router = APIRouter()
DAY = re.compile(r"^\d{4}-\d{2}-\d{2}$")


class TenantCreate(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field(description="A unique name: 1-64 of [A-Za-z0-9._-]; the metrics label of its requests.")
    limits: dict | None = Field(None, description="requests_per_minute, tokens_per_minute, max_concurrent, "
                                                  "max_experts, max_expert_bytes, max_file_bytes (null: unlimited).")


class TenantUpdate(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)
    limits: dict


class KeyCreate(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)
    name: str = Field("", max_length=64, description="A label for the key (where it is used).")


def _state(request: Request) -> ServerState:
    return request.app.state.loraplex


@router.post("/v1/tenants", status_code=201)
async def create_tenant(body: TenantCreate, request: Request):
    store = _state(request).tenants
    return (await asyncio.to_thread(store.create_tenant, body.name, Limits.parse(body.limits))).public()


@router.get("/v1/tenants")
async def list_tenants(request: Request):
    return {"object": "list", "data": [t.public() for t in _state(request).tenants.list_tenants()]}


@router.get("/v1/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, request: Request):
    return _state(request).tenants.tenant(tenant_id).public()


@router.patch("/v1/tenants/{tenant_id}")
async def update_tenant(tenant_id: str, body: TenantUpdate, request: Request):
    """New limits (all of them: a limit left out is unlimited); they apply from the next request."""
    store = _state(request).tenants
    return (await asyncio.to_thread(store.set_limits, tenant_id, Limits.parse(body.limits))).public()


@router.post("/v1/tenants/{tenant_id}/keys", status_code=201)
async def issue_key(tenant_id: str, request: Request, body: KeyCreate | None = None):
    record, key = await asyncio.to_thread(_state(request).tenants.issue_key, tenant_id, (body or KeyCreate()).name)
    return {**record, "key": key}


@router.get("/v1/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: str, request: Request):
    return {"object": "list", "data": _state(request).tenants.list_keys(tenant_id)}


@router.post("/v1/tenants/{tenant_id}/keys/{key_id}/rotate", status_code=201)
async def rotate_key(tenant_id: str, key_id: str, request: Request):
    """A new key for the tenant; the old one is refused from the next request on."""
    record, key = await asyncio.to_thread(_state(request).tenants.rotate_key, tenant_id, key_id)
    return {**record, "key": key, "replaces": key_id}


@router.delete("/v1/tenants/{tenant_id}/keys/{key_id}")
async def revoke_key(tenant_id: str, key_id: str, request: Request):
    return await asyncio.to_thread(_state(request).tenants.revoke_key, tenant_id, key_id)


@router.get("/v1/usage")
async def usage(request: Request, start: str | None = None, end: str | None = None, tenant: str | None = None):
    """Requests and tokens per day (UTC), tenant and model: a tenant's own; the admin's, every tenant's (or
    `tenant`'s)."""
    store, principal = _state(request).tenants, principal_of(request.scope)
    for name, day in (("start", start), ("end", end)):
        if day is not None and not DAY.match(day):
            raise APIError(400, f"{name} must be a day as YYYY-MM-DD", param=name)
    if principal.admin:
        tenant_id = store.tenant(tenant).id if tenant is not None else None
    elif principal.tenant is not None:
        tenant_id = principal.tenant
    else:
        raise APIError(403, "Usage is shown to a tenant's key (its own) or the admin key (everyone's).",
                       code="admin_required")
    rows = await asyncio.to_thread(store.usage, tenant_id, start, end)
    return {"object": "list", "data": rows}
