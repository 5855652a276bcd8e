"""The FastAPI application: its routers, error handlers and middleware; the work happens in the modules they name."""
from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI, Request

from server.api import (admin, batches, corrections, files, fine_tuning, models, responses_api, status, tenants,
                        tokenize)
from server.api.auth import AuthMiddleware
from server.api.chat_completions import chat_completions
from server.api.errors import install_error_handlers
from server.api.openapi import install_openapi
from server.api.playground import install_playground
from server.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, RequestOutcomeMiddleware
from server.api.protocol import ChatCompletionRequest, CompletionRequest
from server.api.state import ServerState
from server.api.text_completions import text_completions
from server.experts.spec import ExpertRegistration


def create_app(state: ServerState) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        # batches run on the server's event loop; unfinished ones resume once the model is loaded
        runner = app.state.batch_runner = batches.BatchRunner(state, app) if state.settings.batches else None
        if runner is not None:
            runner.start()
        try:
            yield
        finally:
            if runner is not None:
                await runner.stop()

    # FastAPI's own telemetry: a span per request from the caller's traceparent, once a tracer provider is set
    # (server/startup/tracing.py; none: no spans). Its metrics and logs stay off: Prometheus and our own log lines
    app = FastAPI(title="loraplex", version="0.1.0", lifespan=lifespan,
                  telemetry={"tracer_provider": state.tracer_provider, "metrics": False, "logs": False})
    app.state.loraplex = state
    app.state.batch_runner = None
    install_error_handlers(app)
    for module in (status, models, tokenize, responses_api, batches):
        app.include_router(module.router)

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat_completions(body, request, state)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await text_completions(body, request, state)

    if state.settings.ui:
        install_playground(app)
    for module in (admin, corrections, files, fine_tuning):
        app.include_router(module.router)
    if state.tenants is not None:
        app.include_router(tenants.router)
    install_openapi(app, ExpertRegistration)
    # added last = outermost: the request id is on every response, 413s included
    app.add_middleware(
        BodyLimitMiddleware,
        limit=state.settings.max_request_bytes,
        upload_limits={"/v1/adapters": state.settings.max_adapter_bytes + 1_000_000,  # files plus form fields
                       "/v1/files": state.settings.max_file_bytes + 1_000_000},
        read_timeout=state.settings.request_body_timeout_s,
    )
    app.add_middleware(AuthMiddleware, settings=state.settings, tenants=state.tenants, limiter=state.limiter,
                       metrics=state.metrics)  # keys before any body byte is read
    app.add_middleware(RequestOutcomeMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)
    return app
