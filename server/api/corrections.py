"""POST /v1/router/corrections (admin key): fix a misroute without re-registering the expert.

Each correction is (prompt, the expert that should have served it). Naming an expert adds the
prompt to that expert's examples; naming the base model says "this should fall back", and adds
the prompt to the negative examples of the expert the router picks for it now. Either way the
expert's record is rewritten in the managed store's manifest (so it survives restarts), its
registry entry is replaced and it is re-indexed, so the next request already routes the new way.
The answer shows, per correction, the route before and after.

Experts from the config file are corrected in the config file (a 400 says so), as they are
retired there. A correction racing a retirement never brings the expert back: every write is
conditional on the registration key it read.
"""
from __future__ import annotations

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from validation.schema import EncodableText
from server.api.errors import APIError
from server.api.state import ServerState
from server.tenants.principal import principal_of

router = APIRouter()


class RouterCorrection(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=20_000, description="A prompt the router sent the wrong way.")
    expert: str = Field(min_length=1, description="The expert that should serve it, or the base model's name: it "
                                                  "should fall back.")


class RouterCorrections(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)

    corrections: list[RouterCorrection] = Field(min_length=1, max_length=100)


def _summary(route) -> dict:
    return {"expert": route.model, "source": route.source, "score": route.score, "margin": route.margin}


@router.post("/v1/router/corrections")
async def correct_routes(body: RouterCorrections, request: Request):
    state: ServerState = request.app.state.loraplex
    state.require_ready()
    router_ = state.router
    if router_.classifier is None:
        raise APIError(503, f"The router is not available: {router_.unavailable_reason}.", code="router_unavailable",
                       headers={"Retry-After": "5"})
    principal = principal_of(request.scope)  # a tenant corrects its own experts only
    for i, item in enumerate(body.corrections):  # every name checked before anything changes
        if item.expert != state.base.name:
            state.experts.correctable(item.expert, f"corrections[{i}].expert", principal)
    results = []
    for i, item in enumerate(body.corrections):
        done = await state.in_text_pool(state.experts.correct, item.prompt, item.expert, f"corrections[{i}].expert",
                                        principal)
        results.append({"object": "router.correction", "prompt": item.prompt, "expert": item.expert,
                        "action": done.action, "changed_expert": done.changed_expert,
                        "before": _summary(done.before), "after": _summary(done.after)})
    return {"object": "list", "data": results}
