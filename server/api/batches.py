"""OpenAI's Batch API: POST /v1/batches, GET /v1/batches[/{id}], POST /v1/batches/{id}/cancel.

A batch is an uploaded JSONL file (purpose "batch") of /v1/chat/completions, /v1/completions or
/v1/responses requests, each `{"custom_id", "method": "POST", "url", "body"}`. Its lines run through
the same endpoint code as interactive requests (so experts, mixtures, `auto`, tools and formats work
per line) at low priority: `batch_priority` is added to each line's `priority`, so the scheduler gives
batch lines only the rows interactive requests leave free and preempts them the step an interactive
request needs a row or KV blocks (server/engine/scheduler.py). At most `batch_concurrency` lines are in
the engine at once, over every batch, so batch work never fills the queue interactive requests need.

Results are appended line by line to the batch's output and error files (server/jobs/batch_store.py)
in OpenAI's format, and published as files (purpose "batch_output") when the batch finalizes. A
restart resumes every unfinished batch at the lines it had not answered. A line that is not a valid
request (bad JSON, no custom_id, a repeated custom_id, another endpoint, a body the endpoint refuses)
is an error-file line; a line that fails because the server is stopping is left for the resume.
With tenants on, a batch belongs to its creator's tenant (server/tenants/principal.py: another tenant's
answers the absent batch's 404), its input file must be the caller's own, its result files are the
tenant's, and its lines run as its creator: they use only the experts the creator may use.
"""
from __future__ import annotations

import asyncio
import json
import logging
import shutil
import time
from typing import Literal

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field, ValidationError

from adapters.admission import AdmissionError
from router.resolve import BadMixture, UnknownExpert
from server.api.chat_completions import chat_completions
from server.api.auth import settle
from server.api.errors import APIError, error_body, validation_message
from server.api.listing import list_page
from server.api.middleware import RequestOutcome
from server.api.protocol import ChatCompletionRequest, CompletionRequest, PageLimit
from server.api.protocol_responses import ResponsesRequest
from server.api.responses_api import create_response
from server.api.state import ServerState
from server.api.text_completions import text_completions
from server.jobs.batch_store import ACTIVE, BatchStore, line_id, request_lines
from server.tenants.principal import Principal, principal_of
from validation.schema import EncodableText

log = logging.getLogger("loraplex.batches")
router = APIRouter()
COMPLETION_WINDOW_S = 24 * 3600
RETRY_S = 0.5  # a line refused for a full queue or a model still loading waits this long, then is tried again
_ENDPOINTS = {"/v1/chat/completions": (ChatCompletionRequest, chat_completions),
              "/v1/completions": (CompletionRequest, text_completions),
              "/v1/responses": (ResponsesRequest, create_response)}


class BatchRequest(EncodableText):
    model_config = ConfigDict(extra="ignore", strict=True)

    input_file_id: str
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/responses"]
    completion_window: Literal["24h"]
    metadata: dict[str, str] | None = Field(None, max_length=16)


class _Stopping(Exception):
    """The server is stopping: the line is left unanswered, for the resume at the next start."""


class _Retry(Exception):
    """The line is not refused, only not now: a full queue, a model still loading, or the creator's tenant
    over its rate or concurrency limit (then for the Retry-After the limiter gave)."""

    def __init__(self, after_s: float = RETRY_S):
        super().__init__()
        self.after_s = after_s


def _never_disconnects():
    async def receive():
        await asyncio.Event().wait()
    return receive


class BatchRunner:
    """Runs batches on the server's event loop: one task per batch, lines through a shared limit."""

    def __init__(self, state: ServerState, app):
        self.state, self.app = state, app
        self.store: BatchStore = state.batches
        self.slots = asyncio.Semaphore(state.settings.batch_concurrency or state.settings.max_batch_size)
        self.tasks: dict[str, asyncio.Task] = {}
        self.live: dict[str, dict] = {}  # running batches' objects, their request_counts current
        self._resumer: asyncio.Task | None = None

    def start(self) -> None:
        self._resumer = asyncio.create_task(self._resume())

    async def stop(self) -> None:
        for task in [self._resumer, *self.tasks.values()]:
            if task is not None:
                task.cancel()
        await asyncio.gather(*[t for t in [self._resumer, *self.tasks.values()] if t], return_exceptions=True)

    async def _resume(self) -> None:
        while not self.state.ready:
            await asyncio.sleep(0.2)
        for batch in reversed(await asyncio.to_thread(self.store.list)):  # oldest first
            if batch["status"] in ACTIVE:
                log.info("resuming batch %s (%s)", batch["id"], batch["status"])
                self.launch(batch["id"])

    def launch(self, batch_id: str) -> None:
        if batch_id not in self.tasks:
            self.tasks[batch_id] = asyncio.create_task(self._run(batch_id))

    def get(self, batch_id: str) -> dict | None:
        return self.live.get(batch_id) or self.store.get(batch_id)

    async def cancel(self, batch_id: str) -> dict:
        batch = await asyncio.to_thread(self.store.update, batch_id, status="cancelling",
                                        cancelling_at=int(time.time()))
        if batch_id in self.live:
            self.live[batch_id].update(status="cancelling", cancelling_at=batch["cancelling_at"])
            return self.live[batch_id]
        self.launch(batch_id)  # not running (never started, or interrupted): it finalizes as cancelled
        return batch

    # ---- one batch --------------------------------------------------------------------------

    async def _run(self, batch_id: str) -> None:
        try:
            await self._work(batch_id)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the batch fails, the server goes on
            log.exception("batch %s failed", batch_id)
            await asyncio.to_thread(self.store.update, batch_id, status="failed", failed_at=int(time.time()),
                                    errors={"object": "list", "data": [
                                        {"code": "batch_failed", "message": str(exc)[:500], "param": None,
                                         "line": None}]})
        finally:
            self.tasks.pop(batch_id, None)
            self.live.pop(batch_id, None)

    async def _work(self, batch_id: str) -> None:
        store, folder = self.store, self.store.folder(batch_id)
        lines = await asyncio.to_thread(request_lines, folder / "input.jsonl")
        done, completed, failed = await asyncio.to_thread(store.answered, batch_id)
        batch = store.get(batch_id)
        counts = {"total": len(lines), "completed": completed, "failed": failed}
        if batch["status"] == "validating":
            batch = await asyncio.to_thread(store.update, batch_id, status="in_progress",
                                            in_progress_at=int(time.time()), request_counts=counts)
        batch["request_counts"] = counts
        self.live[batch_id] = batch
        seen: set[str] = set()
        running: set[asyncio.Task] = set()
        with open(folder / "output.jsonl", "a") as output, open(folder / "errors.jsonl", "a") as errors:

            def write(number: int, record: dict, ok: bool) -> None:
                (output if ok else errors).write(json.dumps({"id": line_id(batch_id, number), **record}) + "\n")
                (output if ok else errors).flush()
                counts["completed" if ok else "failed"] += 1

            stopping = False
            started: set[int] = set()  # run or written in this run
            for number, text in lines:
                custom_id, problem = self._parse(text, batch["endpoint"], seen)
                if number in done:
                    continue
                if batch["status"] == "cancelling" or time.time() > batch["expires_at"]:
                    break
                if problem is not None:
                    started.add(number)
                    write(number, {"custom_id": custom_id, "response": None, "error": problem}, False)
                    continue
                await self.slots.acquire()
                if self.state.draining or batch["status"] == "cancelling":
                    self.slots.release()
                    stopping = self.state.draining
                    break
                started.add(number)
                task = asyncio.create_task(self._line(batch_id, number, custom_id, json.loads(text), write))
                running.add(task)
                task.add_done_callback(running.discard)
                task.add_done_callback(lambda _: self.slots.release())
            while running:  # the lines in the engine finish (or, when the batch is cancelled, are cancelled)
                if batch["status"] == "cancelling":
                    for task in running:
                        task.cancel()
                finished, _ = await asyncio.wait(set(running), timeout=0.2)
                stopping |= any(not t.cancelled() and isinstance(t.exception(), _Stopping) for t in finished)
            if stopping or self.state.draining:
                return  # left in progress: the next start resumes it
            if batch["status"] != "cancelling" and time.time() > batch["expires_at"]:
                for number, text in lines:  # OpenAI writes the lines an expired batch never ran as errors
                    if number not in done and number not in started:
                        custom_id, _ = self._parse(text, batch["endpoint"], set())
                        write(number, {"custom_id": custom_id, "response": None, "error": {
                            "code": "batch_expired", "message": "This line was not run within the batch's "
                                                                "24h completion window."}}, False)
        await self._finalize(batch_id, batch, counts)

    @staticmethod
    def _parse(text: str, endpoint: str, seen: set[str]) -> tuple[str | None, dict | None]:
        """(custom_id, problem): a line that cannot be run is an error line with a code saying why."""
        try:
            line = json.loads(text)
        except (ValueError, RecursionError):
            return None, {"code": "invalid_json_line", "message": "This line is not valid JSON."}
        if not isinstance(line, dict):
            return None, {"code": "invalid_request", "message": "A batch line must be a JSON object."}
        custom_id = line.get("custom_id")
        if not isinstance(custom_id, str) or not custom_id:
            return None, {"code": "missing_custom_id", "message": "Every line needs a custom_id (a string)."}
        if custom_id in seen:
            return custom_id, {"code": "duplicate_custom_id", "message": f"custom_id {custom_id!r} is used by an "
                                                                         "earlier line of this batch."}
        seen.add(custom_id)
        if line.get("method", "POST") != "POST":
            return custom_id, {"code": "invalid_method", "message": "method must be POST."}
        if line.get("url") != endpoint:
            return custom_id, {"code": "mismatched_endpoint", "message": f"url {str(line.get('url'))[:60]!r} is not "
                                                                           f"the batch's endpoint {endpoint}."}
        if not isinstance(line.get("body"), dict):
            return custom_id, {"code": "invalid_request", "message": "body must be a JSON object."}
        if line["body"].get("stream"):
            return custom_id, {"code": "invalid_request", "message": "stream is not supported in a batch."}
        return custom_id, None

    async def _line(self, batch_id: str, number: int, custom_id: str, line: dict, write) -> None:
        request_id = line_id(batch_id, number)
        while True:
            try:
                status, body = await self._call(line["url"], line["body"], request_id, _creator(self.live.get(batch_id)))
                break
            except _Retry as wait:
                await asyncio.sleep(wait.after_s)
            except (_Stopping, asyncio.CancelledError):
                raise
            except Exception:  # a fault of this line's request: its error line, and the batch goes on
                log.exception("batch line %s failed", request_id)
                status, body = 500, error_body(500, "internal server error", None, "internal_error")
                break
        response = {"status_code": status, "request_id": request_id, "body": body}
        write(number, {"custom_id": custom_id, "response": response, "error": None}, status == 200)

    async def _call(self, url: str, body: dict, request_id: str, principal: Principal) -> tuple[int, dict]:
        """(status, body) of one line, through the endpoint's own code, as the batch's creator: a line uses
        only the experts its creator may use (another tenant's answers the absent expert's 404)."""
        tenants, outcome = self.state.tenants, RequestOutcome()
        tenant = tenants.get_tenant(principal.tenant) if tenants is not None and principal.tenant else None
        if tenant is None:
            return await self._endpoint(url, body, request_id, principal, outcome)
        # a line is one of its tenant's requests: the same rate, token and concurrency limits, the same usage
        verdict = self.state.limiter.admit(tenant.id, tenant.limits)
        if verdict.refused is not None:
            raise _Retry(max(RETRY_S, verdict.retry_after))
        try:
            return await self._endpoint(url, body, request_id, principal, outcome)
        finally:
            settle(self.state.limiter, tenants, self.state.metrics, tenant, outcome)

    async def _endpoint(self, url: str, body: dict, request_id: str, principal: Principal,
                        outcome: RequestOutcome) -> tuple[int, dict]:
        model, endpoint = _ENDPOINTS[url]
        scope = {"type": "http", "method": "POST", "path": url, "headers": [], "query_string": b"",
                 "app": self.app, "state": {"request_id": request_id, "principal": principal, "outcome": outcome}}
        request = Request(scope, _never_disconnects())
        try:
            req = model.model_validate(body)
            req.priority = req.priority + self.state.settings.batch_priority
            response = await endpoint(req, request, self.state)
            return response.status_code, json.loads(response.body)
        except ValidationError as exc:
            message, param = validation_message(exc)
            return 400, error_body(400, message, param, "invalid_value")
        except APIError as exc:
            if exc.code == "shutting_down" or self.state.draining:
                raise _Stopping() from None
            if exc.code in ("queue_full", "loading"):
                raise _Retry() from None
            return exc.status, error_body(exc.status, exc.message, exc.param, exc.code)
        except AdmissionError as exc:
            return exc.status, error_body(exc.status, exc.message, exc.param, exc.code)
        except UnknownExpert as exc:
            return 404, error_body(404, f"The model or expert '{exc.name}' does not exist.", exc.param,
                                   "model_not_found")
        except BadMixture as exc:
            return 400, error_body(400, f"Invalid mixture of experts: {exc}.", exc.param, "invalid_mixture")

    async def _finalize(self, batch_id: str, batch: dict, counts: dict) -> None:
        cancelled = batch["status"] == "cancelling"
        expired = not cancelled and time.time() > batch["expires_at"]
        batch.update(status="finalizing", finalizing_at=int(time.time()), request_counts=counts)
        await asyncio.to_thread(self.store.update, batch_id, **batch)
        files = {}
        for name, key in (("output.jsonl", "output_file_id"), ("errors.jsonl", "error_file_id")):
            source = self.store.folder(batch_id) / name
            if source.exists() and source.stat().st_size:
                files[key] = (await asyncio.to_thread(self._publish, source, f"{batch_id}_{name}",
                                                         batch.get("_owner", "")))["id"]
        now = int(time.time())
        final = "cancelled" if cancelled else "expired" if expired else "completed"
        batch.update(files, status=final, **{f"{final}_at": now})
        await asyncio.to_thread(self.store.update, batch_id, **batch)
        log.info("batch %s %s: %s", batch_id, final, counts)

    def _publish(self, source, filename: str, owner: str) -> dict:
        incoming = self.state.files.incoming()
        shutil.copyfile(source, incoming)
        try:
            return self.state.files.create(filename, "batch_output", incoming, owner)
        finally:
            incoming.unlink(missing_ok=True)


def _creator(batch: dict | None) -> Principal:
    """Whom a batch's lines run as: its creator's tenant (or the admin, or a caller without a tenant)."""
    batch = batch or {}
    return Principal(tenant=batch.get("_owner") or None, admin=bool(batch.get("_admin")))


def public(batch: dict) -> dict:
    """The batch as its client sees it: without the `_` fields kept beside it (its owner)."""
    return {k: v for k, v in batch.items() if not k.startswith("_")}


# ---- endpoints ------------------------------------------------------------------------------------

def _runner(request: Request) -> BatchRunner:
    state = request.app.state.loraplex
    state.require_ready()
    runner = getattr(request.app.state, "batch_runner", None)
    if not state.settings.batches or runner is None:
        raise APIError(404, "Batches are turned off on this server (batches: false).", code="batches_disabled")
    return runner


def _batch_or_404(runner: BatchRunner, batch_id: str, principal: Principal) -> dict:
    """The batch if `principal` sees it (server/tenants/principal.py); another tenant's answers as a missing one."""
    batch = runner.get(batch_id)
    if batch is None or not principal.sees(batch.get("_owner", "")):
        raise APIError(404, f"No such batch: {batch_id}", param="batch_id", code="batch_not_found")
    return batch


@router.post("/v1/batches")
async def create_batch(body: BatchRequest, request: Request):
    runner = _runner(request)
    state = runner.state
    principal = principal_of(request.scope)
    record = state.files.get(body.input_file_id)
    if record is not None and not principal.sees(record.get("_owner", "")):
        record = None  # another tenant's file: as if it did not exist
    if record is None or record["purpose"] != "batch":
        raise APIError(404, f"No such File object: {body.input_file_id}" + (
            f" (its purpose is {record['purpose']!r}, not 'batch')" if record else ""),
            param="input_file_id", code="file_not_found")
    path = state.files.content_path(body.input_file_id)
    lines = len(await asyncio.to_thread(request_lines, path))
    limit = state.settings.max_batch_lines  # checked at upload too; the server's limit may have changed since
    if lines > limit:
        raise APIError(400, f"The batch has {lines} requests, over this server's limit of {limit} per batch "
                            "(max_batch_lines).", param="input_file_id", code="batch_too_large")
    now = int(time.time())
    batch = {
        "id": runner.store.new_id(), "object": "batch", "endpoint": body.endpoint, "errors": None,
        "input_file_id": body.input_file_id, "completion_window": body.completion_window, "status": "validating",
        "output_file_id": None, "error_file_id": None, "created_at": now, "in_progress_at": None,
        "expires_at": now + COMPLETION_WINDOW_S, "finalizing_at": None, "completed_at": None, "failed_at": None,
        "expired_at": None, "cancelling_at": None, "cancelled_at": None,
        "request_counts": {"total": lines, "completed": 0, "failed": 0}, "metadata": body.metadata,
        "_owner": principal.owner, "_admin": principal.admin,  # whose it is, and whom its lines run as
    }
    await asyncio.to_thread(runner.store.create, batch, path)
    runner.launch(batch["id"])
    return public(batch)


@router.get("/v1/batches")
async def list_batches(request: Request, after: str | None = None, limit: PageLimit = 20):
    runner = _runner(request)
    principal = principal_of(request.scope)
    batches = [public(runner.live.get(b["id"], b)) for b in await asyncio.to_thread(runner.store.list)
               if principal.sees(b.get("_owner", ""))]
    if after is not None:
        ids = [b["id"] for b in batches]
        batches = batches[ids.index(after) + 1:] if after in ids else []
    return list_page(batches, limit)


@router.get("/v1/batches/{batch_id}")
async def retrieve_batch(batch_id: str, request: Request):
    return public(_batch_or_404(_runner(request), batch_id, principal_of(request.scope)))


@router.post("/v1/batches/{batch_id}/cancel")
async def cancel_batch(batch_id: str, request: Request):
    runner = _runner(request)
    batch = _batch_or_404(runner, batch_id, principal_of(request.scope))
    if batch["status"] in ("cancelling", "cancelled"):
        return public(batch)
    if batch["status"] not in ("validating", "in_progress"):
        raise APIError(409, f"Cannot cancel a batch that is {batch['status']}.", param="batch_id",
                       code="batch_not_cancellable")
    return public(await runner.cancel(batch_id))
