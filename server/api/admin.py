"""/v1/adapters: register, list, show and retire experts while the server runs (admin key)."""
from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from adapters.registry import AdapterRecord, shown
from validation.schema import EncodableText
from server.api.errors import APIError, validation_message
from server.api.state import ServerState
from server.experts.spec import ExpertRegistration
from server.tenants.principal import principal_of

# every path here needs an admin key, or with tenants a tenant's key for its own experts (server/api/auth.py
# checks it before the body; the Experts service checks ownership)
router = APIRouter()
LIST_FIELDS = ("examples", "negative_examples", "stop", "stop_token_ids")
MAX_FIELD_BYTES = 1_000_000  # one multipart field that is not a file: a description, the examples as JSON


def _state(request: Request) -> ServerState:
    state = request.app.state.loraplex
    state.require_ready()
    return state


def _describe(record: AdapterRecord, state: ServerState, tenant: str | None) -> dict:
    """An expert as `tenant` sees it: its own and shared experts by name, another tenant's (an admin looking)
    by ref."""
    return {
        "id": record.shown_to(tenant),
        "object": "adapter",
        "created": record.created,
        "source": record.source,
        "origin": record.origin or None,  # where a fetched expert's files came from (adapter_sources)
        "description": record.description,
        "examples": list(record.examples),
        "negative_examples": list(record.negative_examples),
        "router_margin": record.router_margin,
        "stop": list(record.stop),
        "stop_token_ids": sorted(record.stop_token_ids),
        "defaults": record.defaults,
        "rank": record.rank,
        "target_modules": list(record.target_modules),
        "size_bytes": record.nbytes,
        "tier": "mixture" if record.mixture else state.engine.adapter_tier(record.key),
        "mixture": {shown(ref, tenant): weight for ref, weight in record.mixture} if record.mixture else None,
        "requests": state.registry.request_count(record.ref),
    }


def _form_list(form, field: str) -> list:
    values = form.getlist(field)
    if len(values) == 1 and isinstance(values[0], str) and values[0].lstrip().startswith("["):
        try:
            return json.loads(values[0])
        except (ValueError, RecursionError):  # not JSON, a number over 4,300 digits, nested too deeply
            raise APIError(400, f"'{field}' is not a valid JSON list", param=field) from None
    return values


async def _read_registration(request: Request) -> tuple[ExpertRegistration, dict | None]:
    """The registration fields, and the uploaded files (binary file objects) for a multipart request
    (else None)."""
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            form = await request.form(max_part_size=MAX_FIELD_BYTES)  # the fields; file parts are spooled to disk
            files = {}
            for field in ("adapter_config", "adapter_model"):
                upload = form.get(field)
                if not isinstance(upload, UploadFile):
                    raise APIError(400, f"multipart upload needs a file field '{field}'", param=field)
                files[field] = upload.file  # spooled to disk past a megabyte; staged from there
            fields = {k: v for k, v in form.items() if not isinstance(v, UploadFile) and k not in LIST_FIELDS}
            fields.update({k: _form_list(form, k) for k in LIST_FIELDS if k in form})
            return ExpertRegistration(**fields), files
        body = await request.json()
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        # JSON carries real types: "0.5" for a number is an error here (form fields are all text, so lax)
        registration = ExpertRegistration.model_validate(body, strict=True)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param=param) from None
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise APIError(400, "The request body is not valid JSON.") from None
    except ValueError:  # json's own limit on integers (4,300 digits): no expert field needs one
        raise APIError(400, "The request body holds a number too long to read.") from None
    except RecursionError:
        raise APIError(400, "The request body is nested too deeply.") from None
    if registration.mixture is not None:
        if registration.path is not None:
            raise APIError(400, "a mixture blends registered experts: give 'mixture' or 'path', not both",
                           param="path")
        return registration, None
    if registration.path is None:
        raise APIError(400, "give 'path' (a folder inside adapter_roots), 'mixture' (registered experts and "
                            "weights), or upload the files as multipart/form-data", param="path")
    return registration, None


@router.post("/v1/adapters", status_code=201)
async def register_adapter(request: Request):
    state = _state(request)
    registration, files = await _read_registration(request)
    principal = principal_of(request.scope)
    # in a thread that finishes what it started even if the client goes away: all or nothing either way
    record = await asyncio.to_thread(state.experts.register, registration, files,
                                     "upload" if files else "mixture" if registration.mixture else "path", "",
                                     principal.owner, state.limits_of(principal))
    return _describe(record, state, principal.tenant)


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    state = _state(request)
    principal = principal_of(request.scope)
    return {"object": "list", "data": [_describe(r, state, principal.tenant) for r in state.experts.listed(principal)]}


@router.get("/v1/adapters/{name:path}")  # a fetched expert's name may hold '/'
async def show_adapter(name: str, request: Request):
    state = _state(request)
    principal = principal_of(request.scope)
    return _describe(state.experts.existing(name, "name", principal), state, principal.tenant)


@router.delete("/v1/adapters/{name:path}")
async def delete_adapter(name: str, request: Request):
    state = _state(request)
    # new requests for it get 404 from here on; running ones finish on it, then its memory and files go
    await asyncio.to_thread(state.experts.retire, name, principal_of(request.scope))
    return {"id": name, "object": "adapter", "deleted": True}


# ---- vLLM's adapter endpoints, for gateways and tools written for vLLM ------------------------

class LoadLoraAdapter(EncodableText):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str
    lora_path: str


class UnloadLoraAdapter(EncodableText):
    model_config = ConfigDict(extra="ignore", strict=True)
    lora_name: str


@router.post("/v1/load_lora_adapter")
async def load_lora_adapter(body: LoadLoraAdapter, request: Request):
    """vLLM's `POST /v1/load_lora_adapter`: a registration by path (inside adapter_roots, same checks,
    same store), answered in vLLM's words."""
    state = _state(request)
    registration = ExpertRegistration(name=body.lora_name, path=body.lora_path)
    principal = principal_of(request.scope)
    await asyncio.to_thread(state.experts.register, registration, None, "path", "", principal.owner,
                            state.limits_of(principal))
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapter, request: Request):
    """vLLM's `POST /v1/unload_lora_adapter`: the same retirement as DELETE /v1/adapters/{name}."""
    await delete_adapter(body.lora_name, request)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
