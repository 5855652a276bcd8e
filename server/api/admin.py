"""/v1/adapters: register, list, show and retire experts while the server runs (admin key)."""
from __future__ import annotations

import asyncio
import json
import os
import shutil
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse
from pydantic import ConfigDict, ValidationError
from starlette.datastructures import UploadFile

from adapters.admission import (
    AdmissionError,
    check_new_name,
    check_token_ids,
    fill_from_folder,
    name_taken,
    stage_from_path,
    stage_upload,
    validate_staged,
)
from adapters.registry import AdapterRecord, UnregisteredMember, new_key
from adapters.text import EncodableText
from server.api.errors import APIError, validation_message
from server.api.state import ServerState
from router.classifier import ExpertProfile
from server.settings import AdapterSpec

router = APIRouter()  # every path here needs an admin key (server/auth.py checks it before the body)
REGISTER_TIMEOUT_S = 600  # the engine loads an adapter between steps: seconds at most, even for big ones
LIST_FIELDS = ("examples", "negative_examples", "stop", "stop_token_ids")
MAX_FIELD_BYTES = 1_000_000  # one multipart field that is not a file: a description, the examples as JSON


class AdapterRegistration(AdapterSpec):
    """POST /v1/adapters: an AdapterSpec plus its name; `path` only for registration by path."""

    name: str
    path: str | None = None
    # a mixture of registered experts, served under `name` like any expert: {"pirate": 0.7, "terse": 0.3}
    mixture: dict[str, float] | None = None


def _state(request: Request) -> ServerState:
    state = request.app.state.loraplex
    state.require_ready()
    return state


def _describe(record: AdapterRecord, state: ServerState) -> dict:
    return {
        "id": record.name,
        "object": "adapter",
        "created": record.created,
        "source": record.source,
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
        "mixture": dict(record.mixture) if record.mixture else None,
        "requests": state.registry.request_count(record.name),
    }


def _form_list(form, field: str) -> list:
    values = form.getlist(field)
    if len(values) == 1 and isinstance(values[0], str) and values[0].lstrip().startswith("["):
        try:
            return json.loads(values[0])
        except (ValueError, RecursionError):  # not JSON, a number over 4,300 digits, nested too deeply
            raise APIError(400, f"'{field}' is not a valid JSON list", param=field) from None
    return values


async def _read_registration(request: Request) -> tuple[AdapterRegistration, dict | None]:
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
            return AdapterRegistration(**fields), files
        body = await request.json()
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object")
        # JSON carries real types: "0.5" for a number is an error here (form fields are all text, so lax)
        registration = AdapterRegistration.model_validate(body, strict=True)
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


def _stage_and_validate(state: ServerState, registration: AdapterRegistration, files, staging: Path):
    settings, base = state.settings, state.base
    if files is None:
        stage_from_path(registration.path, settings.adapter_roots, staging, settings.max_adapter_bytes)
        registration = fill_from_folder(registration, staging)  # its expert.json, as checked and staged
    else:
        stage_upload(files["adapter_config"], files["adapter_model"], staging, settings.max_adapter_bytes)
    check_token_ids(registration.stop_token_ids, base.vocab_size, "stop_token_ids")
    weights = validate_staged(staging, base.shape, settings.max_adapter_rank, base.names, settings.base_mismatch)
    return weights, registration


def _register_mixture(state: ServerState, registration: AdapterRegistration) -> AdapterRecord:
    """A named blend of registered experts: checked as a request's mixture is, no weights of its own."""
    name = registration.name
    check_new_name(name, {state.base.name, *state.router.auto_names})
    pairs = list(registration.mixture.items())
    for member, _ in pairs:
        record = state.registry.get(member)
        if record is not None and record.mixture:
            raise APIError(400, f"'{member}' is itself a mixture; blend its experts instead", param="mixture")
    route = state.router.mixture(pairs, "mixture", "mixture", name)  # BadMixture: 400 naming the problem
    if route.expert is None:
        raise APIError(400, "a mixture needs at least one expert with a weight above 0", param="mixture")
    check_token_ids(registration.stop_token_ids, state.base.vocab_size, "stop_token_ids")
    try:  # the members are pinned from here: a DELETE of one now answers 409 until this ends
        if not state.registry.reserve(name, tuple(member for member, _ in route.mixture or ((route.expert, 1.0),))):
            raise name_taken(name)
    except UnregisteredMember as exc:  # retired since the check above
        raise AdmissionError(400, f"'{exc.names[0]}' in the mixture is not a registered expert", "mixture") from None
    classifier = state.router.classifier
    defaults = {k: getattr(registration, k) for k in ("temperature", "top_p", "max_tokens")
                if getattr(registration, k) is not None}
    record = AdapterRecord(name=name, key=new_key(name), folder="", source="mixture", rank=0, target_modules=(),
                           nbytes=0, description=registration.description, examples=tuple(registration.examples),
                           negative_examples=tuple(registration.negative_examples),
                           router_margin=registration.router_margin, stop=tuple(registration.stop),
                           stop_token_ids=frozenset(registration.stop_token_ids), defaults=defaults,
                           mixture=route.mixture or ((route.expert, 1.0),))
    try:
        if classifier is not None:
            classifier.add(name, ExpertProfile.of(record))
        state.store.add_entry(name, record.to_manifest())
    except BaseException:
        if classifier is not None:
            classifier.remove(name)
        state.registry.release(name)
        raise
    state.registry.add(record)
    return record


def register(state: ServerState, registration: AdapterRegistration, files: dict[str, bytes] | None,
             source: str) -> AdapterRecord:
    """Check, store, load and index a new expert, then list it; every step is undone if one fails.
    Blocking (the engine loads the weights): call it in a thread. `files`: the two uploaded files, or
    None to register from `registration.path` (or `registration.mixture`). Raises AdmissionError (its
    own status) or the failure."""
    if registration.mixture is not None:
        return _register_mixture(state, registration)
    name = registration.name
    check_new_name(name, {state.base.name, *state.router.auto_names})
    if not state.registry.reserve(name):
        raise name_taken(name)
    staging = state.store.staging_dir()
    folder = None
    record = None
    classifier = state.router.classifier
    try:
        weights, registration = _stage_and_validate(state, registration, files, staging)
        key = new_key(name)
        folder = state.store.commit_files(staging, key)
        record = AdapterRecord.create(name, str(folder), source, weights, registration, key)
        state.engine.register_adapter(key, str(folder), weights).result(REGISTER_TIMEOUT_S)
        if classifier is not None:  # indexed before it is listed: routable from the next request on
            classifier.add(name, ExpertProfile.of(record))
        # the manifest is written last: once it names the expert, the registration has happened
        state.store.add_entry(name, record.to_manifest())
    except BaseException:
        # leave nothing behind: no staging files, no store folder, no engine entry, no index entry, no name
        shutil.rmtree(staging, ignore_errors=True)
        if classifier is not None:
            classifier.remove(name)
        if record is not None:
            state.engine.retire_adapter(record.key)
        elif folder is not None:
            state.store.delete_files(folder)
        state.registry.release(name)
        raise  # an AdmissionError is answered with its own status (errors.py)
    state.registry.add(record)
    return record


@router.post("/v1/adapters", status_code=201)
async def register_adapter(request: Request):
    state = _state(request)
    registration, files = await _read_registration(request)
    # in a thread that finishes what it started even if the client goes away: all or nothing either way
    record = await asyncio.to_thread(register, state, registration, files,
                                     "upload" if files else "mixture" if registration.mixture else "path")
    return _describe(record, state)


@router.get("/v1/adapters")
async def list_adapters(request: Request):
    state = _state(request)
    return {"object": "list", "data": [_describe(r, state) for r in state.registry.all()]}


def existing(state: ServerState, name: str, param: str = "name") -> AdapterRecord:
    """The registered expert `name`, else 404 naming where the name came from."""
    record = state.registry.get(name)
    if record is None:
        raise APIError(404, f"No adapter named '{name}' is registered.", param=param, code="adapter_not_found")
    return record


@router.get("/v1/adapters/{name}")
async def show_adapter(name: str, request: Request):
    state = _state(request)
    return _describe(existing(state, name), state)


@router.delete("/v1/adapters/{name}")
async def delete_adapter(name: str, request: Request):
    state = _state(request)
    record = existing(state, name)
    if record.source == "config":
        raise APIError(400, f"'{name}' comes from the config file; remove it there and restart", param="name")
    # checked and removed in one step: a mixture being registered meanwhile either pins it first (409
    # here) or finds it gone (its registration fails), never both succeed
    removed, users = state.registry.retire(name)
    if users:
        raise APIError(409, f"'{name}' is blended by the mixture(s) {', '.join(users)}; retire those first",
                       param="name", code="adapter_in_use")
    if removed is None:  # retired by a concurrent request
        raise APIError(404, f"No adapter named '{name}' is registered.", param="name", code="adapter_not_found")
    record = removed
    # new requests for it get 404 from here on
    state.metrics.forget_expert(name)
    if state.router.classifier is not None:
        state.router.classifier.remove(name)
    await asyncio.to_thread(state.store.remove_entry, name, record.key)
    # running requests finish on it; the engine frees memory and files afterwards
    if not record.mixture:  # a mixture has no weights of its own
        state.engine.retire_adapter(record.key)
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
    registration = AdapterRegistration(name=body.lora_name, path=body.lora_path)
    await asyncio.to_thread(register, state, registration, None, "path")
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@router.post("/v1/unload_lora_adapter")
async def unload_lora_adapter(body: UnloadLoraAdapter, request: Request):
    """vLLM's `POST /v1/unload_lora_adapter`: the same retirement as DELETE /v1/adapters/{name}."""
    await delete_adapter(body.lora_name, request)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")
