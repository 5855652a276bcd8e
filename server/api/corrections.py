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

import asyncio
from dataclasses import replace

from fastapi import APIRouter, Request
from pydantic import ConfigDict, Field

from adapters.registry import AdapterRecord
from adapters.text import EncodableText
from router.classifier import ExpertProfile
from server.api.admin import existing
from server.api.errors import APIError
from server.api.state import ServerState

router = APIRouter()
MAX_EXAMPLES = 1000  # per expert and kind: the index refits on every change, and stays fast well past this


class RouterCorrection(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)

    prompt: str = Field(min_length=1, max_length=20_000, description="A prompt the router sent the wrong way.")
    expert: str = Field(min_length=1, description="The expert that should serve it, or the base model's name: it "
                                                  "should fall back.")


class RouterCorrections(EncodableText):
    model_config = ConfigDict(extra="forbid", strict=True)

    corrections: list[RouterCorrection] = Field(min_length=1, max_length=100)


def _correctable(state: ServerState, name: str, param: str) -> AdapterRecord:
    record = existing(state, name, param)
    if record.source == "config":
        raise APIError(400, f"'{name}' comes from the config file; add the example to its entry there",
                       param=param)
    return record


def _summary(route) -> dict:
    return {"expert": route.model, "source": route.source, "score": route.score, "margin": route.margin}


async def _apply(state: ServerState, record: AdapterRecord, field: str, prompt: str) -> bool:
    """Add `prompt` to the record's `field` ("examples" or "negative_examples"); False if already there."""
    current = getattr(record, field)
    if prompt in current:
        return False
    if len(current) >= MAX_EXAMPLES:
        raise APIError(400, f"'{record.name}' already has {MAX_EXAMPLES} {field.replace('_', ' ')}; remove some by "
                            "registering it again", param="corrections")
    updated = replace(record, **{field: (*current, prompt)})
    if not await asyncio.to_thread(state.store.update_entry, record.name, updated.to_manifest()):
        raise APIError(404, f"'{record.name}' was retired meanwhile.", param="corrections", code="adapter_not_found")
    if not state.registry.update(updated):
        raise APIError(404, f"'{record.name}' was retired meanwhile.", param="corrections", code="adapter_not_found")
    classifier = state.router.classifier
    await asyncio.to_thread(classifier.add, record.name, ExpertProfile.of(updated))
    if state.registry.get(record.name) is None:  # retired while re-indexing: not routable
        classifier.remove(record.name)
    return True


@router.post("/v1/router/corrections")
async def correct_routes(body: RouterCorrections, request: Request):
    state: ServerState = request.app.state.loraplex
    state.require_ready()
    router_ = state.router
    if router_.classifier is None:
        raise APIError(503, f"The router is not available: {router_.unavailable_reason}.", code="router_unavailable",
                       headers={"Retry-After": "5"})
    for i, item in enumerate(body.corrections):  # every name checked before anything changes
        if item.expert != state.base.name:
            _correctable(state, item.expert, f"corrections[{i}].expert")
    results = []
    async with state.corrections_lock:  # one read-modify-write of a record at a time
        for i, item in enumerate(body.corrections):
            before = await state.in_text_pool(router_.by_prompt, item.prompt)
            if item.expert == state.base.name:
                if before.source != "classifier" or before.expert is None:
                    action, target = "already_falls_back", None
                else:
                    target = _correctable(state, before.expert, f"corrections[{i}].expert")
                    added = await _apply(state, target, "negative_examples", item.prompt)
                    action = "negative_example_added" if added else "already_a_negative_example"
            else:
                target = _correctable(state, item.expert, f"corrections[{i}].expert")
                added = await _apply(state, target, "examples", item.prompt)
                action = "example_added" if added else "already_an_example"
            after = await state.in_text_pool(router_.by_prompt, item.prompt)
            results.append({"object": "router.correction", "prompt": item.prompt, "expert": item.expert,
                            "action": action, "changed_expert": target.name if target else None,
                            "before": _summary(before), "after": _summary(after)})
    return {"object": "list", "data": results}
