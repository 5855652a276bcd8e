"""Plain ASGI middleware: request ids on every response, and a cap on request body size."""
from __future__ import annotations

import asyncio
import io
import json
import tempfile
import logging
import time
import uuid
from dataclasses import dataclass

from server.api.errors import send_error

request_log = logging.getLogger("loraplex.requests")

REQUEST_ID_HEADER = b"x-request-id"
SPOOL_IN_MEMORY_BYTES = 1 << 20  # an upload's body beyond this goes to a temporary file
REPLAY_CHUNK_BYTES = 1 << 20


class RequestIdMiddleware:
    """Echo X-Request-Id (taken from the request, or generated) on every HTTP response."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        incoming = dict(scope["headers"]).get(REQUEST_ID_HEADER, b"").decode("latin-1")[:128]
        request_id = incoming or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message):
            if message["type"] == "http.response.start":
                headers = [(k, v) for k, v in message.get("headers", []) if k.lower() != REQUEST_ID_HEADER]
                headers.append((REQUEST_ID_HEADER, request_id.encode("latin-1")))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_id)


class BodyLimitMiddleware:
    """Refuse bodies over `limit` bytes with 413 before the app parses anything, and bodies that
    stall (no bytes for `read_timeout` seconds) with 408, so a half-sent body cannot hold a
    connection and its buffer forever.

    The body is read here (bounded), then replayed to the app; after the replay, receive()
    goes to the server again so the app still learns about client disconnects.
    """

    def __init__(self, app, limit: int, upload_limits: dict[str, int] | None = None, read_timeout: float = 30.0):
        self.app = app
        self.default_limit = limit
        self.upload_limits = upload_limits or {}  # path -> its own limit (adapter and training-file uploads)
        self.read_timeout = read_timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            return await self.app(scope, receive, send)
        limit = self.upload_limits.get(scope["path"].rstrip("/"), self.default_limit)
        too_large = f"Request body is larger than the limit of {limit} bytes."
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await send_error(send, 413, too_large, code="request_too_large")
        # an upload (adapter files, a training file) may be hundreds of megabytes: it is spooled to disk
        # past the first megabyte, so what a request holds in memory is bounded whatever its size
        body = tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY_BYTES) if scope["path"].rstrip("/") in \
            self.upload_limits else io.BytesIO()
        with body:
            size = 0
            while True:
                try:
                    message = await asyncio.wait_for(receive(), self.read_timeout)
                except asyncio.TimeoutError:
                    return await send_error(send, 408, f"No request body bytes arrived for {self.read_timeout:g} s.",
                                            code="request_timeout", headers={"Connection": "close"})
                if message["type"] == "http.disconnect":
                    return
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    return await send_error(send, 413, too_large, code="request_too_large")
                body.write(chunk)
                if not message.get("more_body", False):
                    break
            body.seek(0)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    chunk = body.read(REPLAY_CHUNK_BYTES)
                    more = body.tell() < size
                    replayed = not more
                    return {"type": "http.request", "body": chunk, "more_body": more}
                return await receive()

            await self.app(scope, replay, send)


@dataclass
class RequestOutcome:
    """What the handler learns about a completion request, for the middleware to count and log."""

    model: str | None = None  # who served it by name: the expert's or the base's, or the mixture as asked
    label: str | None = None  # its metrics label (server/metrics.py: registered names only)
    source: str | None = None  # how it was chosen: header | model | base | classifier | fallback
    finish_reason: str | None = None  # of choice 0, once every choice has finished ("error" if the server ended it)
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    ttft_s: float | None = None


def outcome_of(scope) -> RequestOutcome:
    """The request's outcome record, made on first use."""
    state = scope.setdefault("state", {})
    if "outcome" not in state:
        state["outcome"] = RequestOutcome()
    return state["outcome"]


class RequestOutcomeMiddleware:
    """Counts every (chat or text) completion by adapter, finish reason and status; logs one JSON line.

    The handler fills scope["state"]["outcome"] as it learns things (expert, routing source,
    tokens, timings); this layer sees the status and whether the body was sent to the end, so
    a client that went away mid-stream is counted as `cancelled`.
    """

    def __init__(self, app, metrics, paths: tuple[str, ...] = ("/v1/chat/completions", "/v1/completions")):
        self.app = app
        self.metrics = metrics
        self.paths = paths

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] not in self.paths:
            return await self.app(scope, receive, send)
        outcome = outcome_of(scope)
        status, completed, start = 500, False, time.monotonic()

        async def tracking_send(message):
            nonlocal status, completed
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                completed = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        finally:
            finish = outcome.finish_reason
            if status == 499 or (status == 200 and not (completed and finish)):
                finish = "cancelled"
            adapter = outcome.model or "none"
            self.metrics.requests.labels(self.metrics.label(outcome.label), finish or "none", str(status)).inc()
            request_log.info(json.dumps({
                "request_id": scope["state"].get("request_id"),
                "endpoint": scope["path"],
                "adapter": adapter,
                "source": outcome.source,
                "status": status,
                "finish_reason": finish,
                "prompt_tokens": outcome.prompt_tokens,
                "completion_tokens": outcome.completion_tokens,
                "ttft_s": outcome.ttft_s,
                "e2e_s": round(time.monotonic() - start, 4),
            }))
