"""OpenAI's fine_tuning.jobs endpoints (admin key): a training file in, a served expert out.

`client.files.create(file=..., purpose="fine-tune")` (files.py) stores a chat JSONL file after checking
every line (each problem names its line); `client.fine_tuning.jobs.create(model=<base>, training_file=...)`
queues a QLoRA run on the served base (server/jobs/); when it ends the adapter passes the registry's
usual admission checks and serves as `ft:<base>:<suffix>:<job id>`. Object shapes are OpenAI's, so the
unmodified client's `retrieve`, `list`, `cancel`, `list_events` and `checkpoints.list` work.
Extensions (send with the client's `extra_body`): `rank`, `target_modules`, and the expert's
`description`, `examples`, `negative_examples` and `stop` for the router and the registry. A job given
no `examples` is routed by prompts of its own training file (24, spread through it), so a fine-tuned
expert is reachable through `auto` without hand-written examples.
"""
from __future__ import annotations

import asyncio
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, ValidationError

from adapters.lora import LINEAR_MODULES
from validation.schema import EncodableText
from server.api.errors import APIError, validation_message
from server.api.protocol import PageLimit
from server.api.state import ServerState
from server.experts.spec import ExpertRegistration
from server.jobs.store import new_id
from server.tenants.principal import Principal, principal_of

router = APIRouter()
PUBLIC_JOB_FIELDS = ("id", "object", "model", "created_at", "finished_at", "fine_tuned_model", "organization_id",
                     "result_files", "status", "validation_file", "training_file", "hyperparameters",
                     "trained_tokens", "error", "seed", "estimated_finish", "integrations", "user_provided_suffix",
                     "method", "metadata")
ORGANIZATION = "loraplex"


def fine_tuning_state(request: Request) -> ServerState:
    state = request.app.state.loraplex
    state.require_ready()
    if state.jobs is None:
        raise APIError(404, "Fine-tuning is turned off on this server (fine_tuning: false).",
                       code="fine_tuning_disabled")
    return state


# ---- jobs -------------------------------------------------------------------------------

class Hyperparameters(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)

    n_epochs: Literal["auto"] | int = Field("auto", description="Passes over the training file (auto: 3).")
    batch_size: Literal["auto"] | int = Field("auto", description="Conversations per step (auto: 8).")
    learning_rate_multiplier: Literal["auto"] | float = Field("auto", description="x 1e-3 (auto: 1).")


class SupervisedMethod(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)


class Method(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)
    type: Literal["supervised"] = "supervised"
    supervised: SupervisedMethod = Field(default_factory=SupervisedMethod)


class JobRequest(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)

    model: str
    training_file: str
    validation_file: str | None = None
    suffix: str | None = Field(None, min_length=1, max_length=40, pattern=r"^[A-Za-z0-9._-]+$")
    seed: int | None = Field(None, ge=0, le=2**31 - 1)
    hyperparameters: Hyperparameters | None = None
    method: Method | None = None
    metadata: dict[str, str] | None = None
    integrations: list | None = None
    # loraplex extensions
    rank: int = Field(8, ge=1, le=256)
    target_modules: list[str] = Field(default_factory=lambda: list(LINEAR_MODULES), min_length=1)
    description: str = ""
    examples: list[str] = Field(default_factory=list)
    negative_examples: list[str] = Field(default_factory=list)
    stop: list[str] = Field(default_factory=list)


def _found(record: dict | None, message: str, param: str, code: str) -> dict:
    """The record, or a 404 in OpenAI's words."""
    if record is None:
        raise APIError(404, message, param=param, code=code)
    return record


def _resolve(value, auto):
    return auto if value == "auto" else value


def _hyperparameters(body: JobRequest) -> dict:
    if body.hyperparameters is not None and body.method is not None:
        raise APIError(400, "give hyperparameters either at the top level or in method.supervised, not both",
                       param="hyperparameters")
    given = body.method.supervised.hyperparameters if body.method is not None else (
        body.hyperparameters or Hyperparameters())
    resolved = {"n_epochs": _resolve(given.n_epochs, 3), "batch_size": _resolve(given.batch_size, 8),
                "learning_rate_multiplier": float(_resolve(given.learning_rate_multiplier, 1.0))}
    for name, low, high in (("n_epochs", 1, 50), ("batch_size", 1, 256)):
        if not low <= resolved[name] <= high:
            raise APIError(400, f"{name} must be 'auto' or {low}..{high}", param=f"hyperparameters.{name}")
    if not 0 < resolved["learning_rate_multiplier"] <= 100:
        raise APIError(400, "learning_rate_multiplier must be 'auto' or in (0, 100]",
                       param="hyperparameters.learning_rate_multiplier")
    return resolved


def public(job: dict) -> dict:
    out = {k: job.get(k) for k in PUBLIC_JOB_FIELDS}
    out["loraplex"] = {"rank": job["_rank"], "target_modules": job["_targets"], "steps_done": job.get("_steps_done", 0),
                       "total_steps": job.get("_total_steps"), "examples": job.get("_examples"),
                       "router_examples": len(job.get("_examples_for_router") or ()),
                       "router_examples_from": "training_file" if job.get("_examples_from_training_file")
                       else "request"}
    return out


def _job_or_404(state: ServerState, job_id: str, principal: Principal) -> dict:
    """The job if `principal` owns it; another tenant's answers as a missing one."""
    job = state.jobs.store.get(job_id)
    if job is not None and not principal.owns(job.get("_owner", "")):
        job = None
    return _found(job, f"No such fine-tuning job: {job_id}", "fine_tuning_job_id", "job_not_found")


def _page(items: list[dict], after: str | None, limit: int) -> dict:
    if after is not None:
        ids = [item["id"] for item in items]
        items = items[ids.index(after) + 1:] if after in ids else []
    limit = max(1, min(limit, 100))
    return {"object": "list", "data": items[:limit], "has_more": len(items) > limit}


@router.post("/v1/fine_tuning/jobs")
async def create_job(body: JobRequest, request: Request):
    state = fine_tuning_state(request)
    if body.model != state.base.name:
        raise APIError(400, f"Model {body.model!r} cannot be fine-tuned here: this server trains experts on the base "
                            f"it serves, {state.base.name!r}.", param="model", code="model_not_available")
    unknown = [m for m in body.target_modules if m not in LINEAR_MODULES]
    if unknown:
        raise APIError(400, f"unknown target modules {unknown}; choose from {list(LINEAR_MODULES)}",
                       param="target_modules")
    if body.rank > state.settings.max_adapter_rank:
        raise APIError(400, f"rank {body.rank} is over max_adapter_rank ({state.settings.max_adapter_rank})",
                       param="rank")
    principal = principal_of(request.scope)
    for field in ("training_file", "validation_file"):
        file_id = getattr(body, field)
        record = state.files.get(file_id) if file_id is not None else None
        if file_id is not None and (record is None or record["purpose"] != "fine-tune"
                                    or not principal.owns(record.get("_owner", ""))):
            raise APIError(400, f"No such File object: {file_id}", param=field, code="file_not_found")
    hyper = _hyperparameters(body)
    try:  # the expert's fields pass the registry's checks now, not after hours of training
        ExpertRegistration(name="check", description=body.description, examples=body.examples,
                           negative_examples=body.negative_examples, stop=body.stop)
    except ValidationError as exc:
        message, param = validation_message(exc)
        raise APIError(400, message, param=param) from None
    job_id = new_id("ftjob")
    job = {
        "id": job_id, "object": "fine_tuning.job", "model": body.model, "created_at": int(time.time()),
        "finished_at": None, "fine_tuned_model": None, "organization_id": ORGANIZATION, "result_files": [],
        "status": "validating_files", "validation_file": body.validation_file, "training_file": body.training_file,
        "hyperparameters": hyper, "trained_tokens": None, "error": None,
        "seed": body.seed if body.seed is not None else 0, "estimated_finish": None, "integrations": [],
        "user_provided_suffix": body.suffix, "metadata": body.metadata,
        "method": {"type": "supervised", "supervised": {"hyperparameters": hyper}},
        "_rank": body.rank, "_targets": body.target_modules, "_description": body.description,
        "_examples_for_router": body.examples, "_negative_examples": body.negative_examples, "_stop": body.stop,
        "_owner": principal.owner,  # the tenant the trained expert will belong to
    }
    job = await asyncio.to_thread(state.jobs.submit, job)
    return public(job)


@router.get("/v1/fine_tuning/jobs")
async def list_jobs(request: Request, after: str | None = None, limit: PageLimit = 20):
    state = fine_tuning_state(request)
    principal = principal_of(request.scope)
    page = _page([job for job in state.jobs.store.list() if principal.owns(job.get("_owner", ""))], after, limit)
    page["data"] = [public(job) for job in page["data"]]
    return page


@router.get("/v1/fine_tuning/jobs/{job_id}")
async def retrieve_job(job_id: str, request: Request):
    return public(_job_or_404(fine_tuning_state(request), job_id, principal_of(request.scope)))


@router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
async def cancel_job(job_id: str, request: Request):
    state = fine_tuning_state(request)
    job = _job_or_404(state, job_id, principal_of(request.scope))
    if job["status"] in ("succeeded", "failed"):
        raise APIError(400, f"The job has already {job['status']}; there is nothing to cancel.",
                       param="fine_tuning_job_id", code="job_finished")
    job = await asyncio.to_thread(state.jobs.cancel, job_id)
    for _ in range(100):  # a running worker is killed within seconds: answer once it is
        if job["status"] == "cancelled":
            break
        await asyncio.sleep(0.1)
        job = state.jobs.store.get(job_id)
    return public(job)


@router.get("/v1/fine_tuning/jobs/{job_id}/events")
async def list_events(job_id: str, request: Request, after: str | None = None, limit: PageLimit = 20):
    state = fine_tuning_state(request)
    _job_or_404(state, job_id, principal_of(request.scope))
    return _page(list(reversed(state.jobs.store.events(job_id))), after, limit)  # newest first, as OpenAI


@router.get("/v1/fine_tuning/jobs/{job_id}/checkpoints")
async def list_checkpoints(job_id: str, request: Request, after: str | None = None, limit: PageLimit = 10):
    state = fine_tuning_state(request)
    job = _job_or_404(state, job_id, principal_of(request.scope))
    checkpoints = [{
        "object": "fine_tuning.job.checkpoint", "id": f"ftckpt-{job_id.removeprefix('ftjob-')}-{c['step']}",
        "created_at": c["created_at"], "fine_tuning_job_id": job_id, "step_number": c["step"],
        # resume points of the run; the served model is the job's fine_tuned_model
        "fine_tuned_model_checkpoint": f"{job['fine_tuned_model'] or job_id}:ckpt-step-{c['step']}",
        "metrics": {"step": c["step"], "train_loss": c.get("train_loss"), "valid_loss": c.get("valid_loss")},
    } for c in reversed(job.get("_checkpoints", []))]
    return _page(checkpoints, after, limit)
