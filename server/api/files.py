"""OpenAI's files endpoints: training files (purpose "fine-tune", admin key) and batch files (purpose "batch"
in, "batch_output" out; the API key).

An upload is spooled to disk, checked there and kept, never held in memory whole. A training file has
every line checked as a conversation (server/jobs/checker.py, each problem naming its line); a batch
file is checked to be UTF-8 JSONL of at most max_batch_lines requests, and a line that is not a valid
request becomes an error-file line when the batch runs (batches.py), as OpenAI reports it.
Who sees what: an admin key sees every file; an API key (or anyone, on a server without API keys) sees
the batch files only. With tenants on (server/tenants/principal.py), a file belongs to the tenant whose
key uploaded it (a batch's result files to the batch's tenant): a tenant's key may upload training files
too, and sees its own files only; another tenant's file answers the absent file's 404, in its words.
"""
from __future__ import annotations

import asyncio
import shutil
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.responses import Response
from starlette.datastructures import UploadFile

from server.api.auth import training_files_refusal
from server.api.errors import APIError
from server.api.state import ServerState
from server.jobs.batch_store import batch_file_problems
from server.tenants.principal import Principal, principal_of

router = APIRouter()
MAX_FIELD_BYTES = 64_000  # a multipart field that is not the file (purpose)
BATCH_PURPOSES = ("batch", "batch_output")


def _state(request: Request) -> ServerState:
    state = request.app.state.loraplex
    state.require_ready()
    if state.jobs is None and not state.settings.batches:
        raise APIError(404, "Files are not served: fine-tuning and batches are turned off on this server "
                            "(fine_tuning: false, batches: false).", code="files_disabled")
    return state


def _training_refusal(request: Request, state: ServerState) -> tuple[int, str, str] | None:
    principal = principal_of(request.scope) if state.tenants is not None else None
    return training_files_refusal(dict(request.scope["headers"]), state.settings, principal)


def _is_admin(request: Request, state: ServerState) -> bool:
    return _training_refusal(request, state) is None


def _require_training(request: Request, state: ServerState) -> None:
    """Training files are the registry's: an admin key (or a tenant's), and fine-tuning turned on."""
    refused = _training_refusal(request, state)
    if refused is not None:
        status, message, code = refused
        raise APIError(status, message, code=code, headers={"WWW-Authenticate": "Bearer"} if status == 401 else None)
    if state.jobs is None:
        raise APIError(404, "Fine-tuning is turned off on this server (fine_tuning: false).",
                       code="fine_tuning_disabled")


def visible(record: dict | None, admin: bool, principal: Principal) -> dict | None:
    """The file as this caller may see it (its `_` fields stay here): another tenant's is not there at all;
    an API key sees batch files only."""
    if record is None:
        return None
    owner = record.get("_owner", "")
    if not (principal.owns(owner) if record["purpose"] not in BATCH_PURPOSES else principal.sees(owner)):
        return None  # another tenant's (training files are private: ANONYMOUS sees none with an owner)
    if admin or record["purpose"] in BATCH_PURPOSES:
        return {k: v for k, v in record.items() if not k.startswith("_")}
    return None


def _file_or_404(request: Request, state: ServerState, file_id: str) -> dict:
    record = visible(state.files.get(file_id), _is_admin(request, state), principal_of(request.scope))
    if record is None:
        raise APIError(404, f"No such File object: {file_id}", param="file_id", code="file_not_found")
    return record


def _check_file_quota(state: ServerState, principal: Principal, size: int) -> None:
    """A tenant's files (training and batch, results included) stay under its max_file_bytes."""
    limits = state.limits_of(principal)
    if limits is None or limits.max_file_bytes is None:
        return
    used = sum(f["bytes"] for f in state.files.list() if f.get("_owner") == principal.tenant)
    if used + size > limits.max_file_bytes:
        raise APIError(429, f"This file ({size} bytes) would take this tenant's files to {used + size} bytes, over "
                            f"its limit (max_file_bytes: {limits.max_file_bytes}); delete some first.", param="file",
                       code="insufficient_quota")


@router.post("/v1/files")
async def create_file(request: Request):
    state = _state(request)
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise APIError(400, "Upload the file as multipart/form-data with fields 'file' and 'purpose'.", param="file")
    limit = state.settings.max_file_bytes
    form = await request.form(max_part_size=MAX_FIELD_BYTES)  # fields; the file part is spooled to disk
    purpose, upload = form.get("purpose"), form.get("file")
    if purpose == "fine-tune":
        _require_training(request, state)
    elif purpose == "batch":
        if not state.settings.batches:
            raise APIError(404, "Batches are turned off on this server (batches: false).", param="purpose",
                           code="batches_disabled")
    else:
        raise APIError(400, f"purpose must be 'fine-tune' (training files, admin key) or 'batch' (batch input "
                            f"files), not {str(purpose)[:40]!r}", param="purpose")
    if not isinstance(upload, UploadFile):
        raise APIError(400, "multipart upload needs a file field 'file'", param="file")
    if upload.size is None or upload.size > limit:
        raise APIError(413, f"The file is {upload.size} bytes; the limit is {limit} (max_file_bytes).", param="file",
                       code="file_too_large")
    principal = principal_of(request.scope)
    _check_file_quota(state, principal, upload.size)
    # the upload is on disk already (the body was spooled, its file part too): copied, checked and kept
    # from there, never held in memory whole
    incoming = state.files.incoming()
    try:
        await asyncio.to_thread(_save, upload.file, incoming)
        if purpose == "batch":
            problems = await asyncio.to_thread(batch_file_problems, incoming, state.settings.max_batch_lines)
            if problems:
                raise APIError(400, "The batch file has problems: " + "; ".join(problems), param="file",
                               code="invalid_batch_file")
        else:
            try:
                problems = await asyncio.to_thread(state.jobs.check_file, incoming)
            except BrokenProcessPool:
                raise APIError(503, "The training-file checker stopped unexpectedly; retry the upload.",
                               param="file", code="checker_unavailable", headers={"Retry-After": "1"}) from None
            if problems:
                raise APIError(400, "The training file has problems: " + "; ".join(problems), param="file",
                               code="invalid_training_file")
        filename = (upload.filename or "upload.jsonl").rsplit("/", 1)[-1][:255]
        record = await asyncio.to_thread(state.files.create, filename, purpose, incoming, principal.owner)
        return {k: v for k, v in record.items() if not k.startswith("_")}
    finally:
        incoming.unlink(missing_ok=True)  # gone already once stored


def _save(source, target: Path) -> None:
    source.seek(0)
    with open(target, "wb") as handle:
        shutil.copyfileobj(source, handle, 1 << 20)


@router.get("/v1/files")
async def list_files(request: Request, purpose: str | None = None):
    state = _state(request)
    admin, principal = _is_admin(request, state), principal_of(request.scope)
    data = [seen for f in await asyncio.to_thread(state.files.list)
            if (purpose is None or f["purpose"] == purpose) and (seen := visible(f, admin, principal))]
    return {"object": "list", "data": data, "has_more": False}


@router.get("/v1/files/{file_id}")
async def retrieve_file(file_id: str, request: Request):
    state = _state(request)
    return _file_or_404(request, state, file_id)


@router.get("/v1/files/{file_id}/content")
async def file_content(file_id: str, request: Request):
    state = _state(request)
    _file_or_404(request, state, file_id)
    data = await asyncio.to_thread(state.files.content_path(file_id).read_bytes)
    return Response(data, media_type="application/jsonl")


@router.delete("/v1/files/{file_id}")
async def delete_file(file_id: str, request: Request):
    state = _state(request)
    _file_or_404(request, state, file_id)
    # a job or a batch keeps its own copy of its input: deleting a file never breaks a queued or running one
    await asyncio.to_thread(state.files.delete, file_id)
    return {"id": file_id, "object": "file", "deleted": True}
