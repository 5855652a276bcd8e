"""GET /v1/models (the base, the experts, the router's names) and POST /v1/route (the router's decision)."""
from __future__ import annotations

from fastapi import APIRouter, Request

from adapters.registry import shown
from server.api.chat_completions import last_user_text
from server.api.dispatch import route_request
from server.api.errors import APIError
from server.api.protocol import RouteRequest
from server.api.state import ServerState
from server.tenants.principal import principal_of

router = APIRouter()


def _model_entry(model_id: str, created: int, parent: str | None = None, owned_by: str = "loraplex") -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": owned_by, "parent": parent}


def _router_entries(state: ServerState) -> list[dict]:
    """The names that mean "let the router choose" ("auto"), listed so clients can discover them."""
    names = sorted(state.router.auto_names)
    return [_model_entry(name, state.started_at, owned_by="loraplex-router") for name in names]


def _ready(request: Request) -> ServerState:
    state = request.app.state.loraplex
    state.require_ready()
    return state


@router.get("/v1/models")
async def list_models(request: Request):
    state = _ready(request)
    base = state.base.name
    data = [_model_entry(base, state.started_at)]
    principal = principal_of(request.scope)
    data += [_model_entry(r.shown_to(principal.tenant), state.started_at, parent=base)
             for r in state.experts.listed(principal)]
    return {"object": "list", "data": data + _router_entries(state)}


@router.get("/v1/models/{model_id:path}")  # a fetched expert's name may hold '/'
async def get_model(model_id: str, request: Request):
    state = _ready(request)
    if model_id == state.base.name:
        return _model_entry(model_id, state.started_at)
    if state.experts.lookup(model_id, principal_of(request.scope)) is not None:
        return _model_entry(model_id, state.started_at, parent=state.base.name)
    for entry in _router_entries(state):
        if entry["id"] == model_id:
            return entry
    raise APIError(404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found")


@router.post("/v1/route")
async def route(body: RouteRequest, request: Request):
    """The router's decision and ranking for these messages, without generating."""
    state = _ready(request)
    decision = await route_request(body.model, last_user_text(body.messages), request, state, body.router_top_k)
    tenant = principal_of(request.scope).tenant
    return {
        "object": "route",
        "decision": {"expert": decision.model, "adapter": decision.expert and shown(decision.expert, tenant),
                     "source": decision.source,
                     "score": decision.score, "background": decision.background, "margin": decision.margin,
                     "required_margin": decision.required, "reason": decision.reason,
                     "mixture": [{"expert": name, "weight": weight} for name, weight in decision.named] or None},
        "router_margin": state.router.margin,
        "ranking": [{"expert": shown(s.expert, tenant), "score": s.score, "probability": s.probability,
                     "excluded": s.excluded or None, "router_margin": s.margin, "margin_floor": s.floor}
                    for s in decision.ranking[: body.top_k]],
    }
