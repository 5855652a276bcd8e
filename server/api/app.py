"""The FastAPI application: routes only; the work happens in completions.py, text_completions.py and the engine."""
from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from server.api import admin, corrections, fine_tuning
from server.api.auth import AuthMiddleware
from server.api.chat_completions import chat_completions, last_user_text
from server.api.dispatch import route_request
from server.api.errors import APIError, install_error_handlers
from server.api.openapi import install_openapi
from server.api.playground import install_playground
from server.api.middleware import BodyLimitMiddleware, RequestIdMiddleware, RequestOutcomeMiddleware
from server.api.protocol import ChatCompletionRequest, CompletionRequest, RouteRequest
from server.api.state import ServerState
from server.api.text_completions import text_completions
from server.experts.spec import ExpertRegistration


def _model_entry(model_id: str, created: int, parent: str | None = None, owned_by: str = "loraplex") -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent}


def _router_entries(state: ServerState) -> list[dict]:
    """The names that mean "let the router choose" ("auto"), listed so clients can discover them."""
    names = sorted(state.router.auto_names)
    return [_model_entry(name, state.started_at, owned_by="loraplex-router") for name in names]


def create_app(state: ServerState) -> FastAPI:
    app = FastAPI(title="loraplex", version="0.1.0")
    app.state.loraplex = state
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        engine = state.engine
        if state.draining:
            return JSONResponse({"status": "draining", "running": engine.num_running}, status_code=503)
        if engine.load_error is not None:
            return JSONResponse({"status": "failed", "error": str(engine.load_error)}, status_code=503)
        if not state.ready:
            return JSONResponse({"status": "loading"}, status_code=503)
        router = "ready" if state.router.classifier is not None else state.router.unavailable_reason
        health = {"status": "ok", "running": engine.num_running, "waiting": engine.num_waiting, "router": router}
        if state.replicas is not None:  # Ray Serve: each engine replica as it last reported
            health["replicas"] = state.replicas.replicas()
        return health

    @app.get("/metrics")
    async def metrics():
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def list_models():
        state.require_ready()
        base = state.base.name
        data = [_model_entry(base, state.started_at)]
        data += [_model_entry(r.name, state.started_at, parent=base) for r in state.registry.all()]
        return {"object": "list", "data": data + _router_entries(state)}

    @app.get("/v1/models/{model_id:path}")  # a fetched expert's name may hold '/'
    async def get_model(model_id: str):
        state.require_ready()
        if model_id == state.base.name:
            return _model_entry(model_id, state.started_at)
        if state.registry.get(model_id) is not None:
            return _model_entry(model_id, state.started_at, parent=state.base.name)
        for entry in _router_entries(state):
            if entry["id"] == model_id:
                return entry
        raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")

    @app.post("/v1/route")
    async def route(body: RouteRequest, request: Request):
        """The router's decision and ranking for these messages, without generating."""
        state.require_ready()
        decision = await route_request(body.model, last_user_text(body.messages), request, state, body.router_top_k)
        return {
            "object": "route",
            "decision": {"expert": decision.model, "adapter": decision.expert, "source": decision.source,
                         "score": decision.score, "background": decision.background, "margin": decision.margin,
                         "required_margin": decision.required, "reason": decision.reason,
                         "mixture": [{"expert": name, "weight": weight} for name, weight in decision.mixture] or None},
            "router_margin": state.router.margin,
            "ranking": [{"expert": s.expert, "score": s.score, "probability": s.probability,
                         "excluded": s.excluded or None, "router_margin": s.margin}
                        for s in decision.ranking[: body.top_k]],
        }

    @app.post("/v1/chat/completions")
    async def create_chat_completion(body: ChatCompletionRequest, request: Request):
        return await chat_completions(body, request, state)

    @app.post("/v1/completions")
    async def create_completion(body: CompletionRequest, request: Request):
        return await text_completions(body, request, state)

    if state.settings.ui:
        install_playground(app)
    app.include_router(admin.router)
    app.include_router(corrections.router)
    app.include_router(fine_tuning.router)
    install_openapi(app, ExpertRegistration)
    # added last = outermost: the request id is on every response, 413s included
    app.add_middleware(
        BodyLimitMiddleware,
        limit=state.settings.max_request_bytes,
        upload_limits={"/v1/adapters": state.settings.max_adapter_bytes + 1_000_000,  # files plus form fields
                       "/v1/files": state.settings.max_file_bytes + 1_000_000},
        read_timeout=state.settings.request_body_timeout_s,
    )
    app.add_middleware(AuthMiddleware, settings=state.settings)  # keys before any body byte is read
    app.add_middleware(RequestOutcomeMiddleware, metrics=state.metrics)
    app.add_middleware(RequestIdMiddleware)
    return app
