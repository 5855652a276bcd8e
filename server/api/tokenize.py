"""vLLM's POST /tokenize and /detokenize: count a prompt's tokens (raw text, or chat messages through the
chat template exactly as /v1/chat/completions renders them) and turn token ids back into text.

Every served name (the base, an expert, a mixture, `auto`) has the base's tokenizer, so `model` is
only checked to be served. An expert's stop token ids can be looked up here.
"""
from __future__ import annotations

from fastapi import APIRouter, Request

from adapters.admission import check_token_ids
from server.api.dispatch import check_prompt_chars
from server.api.errors import APIError
from server.api.protocol import DetokenizeRequest, TokenizeRequest
from server.api.state import ServerState
from server.tenants.principal import principal_of

router = APIRouter()


def _ready(request: Request, model: str | None) -> ServerState:
    state = request.app.state.loraplex
    state.require_ready()
    if model is not None and model != state.base.name \
            and state.experts.lookup(model, principal_of(request.scope)) is None \
            and model not in state.router.auto_names:
        raise APIError(404, f"The model '{model}' does not exist.", param="model", code="model_not_found")
    return state


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request):
    state = _ready(request, body.model)
    base = state.base
    if body.messages is not None:
        check_prompt_chars(sum(len(m.text()) for m in body.messages), "messages", state)
        ids = await state.in_text_pool(base.prompts.render, body.messages, body.tools, body.add_generation_prompt)
        if body.add_special_tokens:  # the template wrote its own; a BOS the tokenizer adds goes in front
            ids = base.prompts.encode("", add_special_tokens=True) + ids
    else:
        check_prompt_chars(len(body.prompt), "prompt", state)
        special = True if body.add_special_tokens is None else body.add_special_tokens
        ids = await state.in_text_pool(base.prompts.encode, body.prompt, special)
    return {"count": len(ids), "max_model_len": base.context_window, "tokens": ids,
            "token_strs": base.tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, request: Request):
    state = _ready(request, body.model)
    check_token_ids(body.tokens, state.base.vocab_size, "tokens")
    text = await state.in_text_pool(state.base.tokenizer.decode, body.tokens)
    return {"prompt": text}
