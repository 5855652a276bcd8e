"""One generation request on its way in: route it, set its sampling, check it fits, queue it.

Shared by /v1/chat/completions and /v1/completions, which differ only in how the prompt is
made (chat_completions.py, text_completions.py) and how the answer is shaped (responses.py
collects or streams it).
"""
from __future__ import annotations

import asyncio
import secrets
import time
import uuid
from dataclasses import dataclass, field

from fastapi import Request

from adapters.admission import check_token_ids
from adapters.registry import AdapterRecord, shown
from router.resolve import Route, UnknownExpert, UnknownMember
from server.api.errors import APIError
from server.api.middleware import RequestOutcome, outcome_of
from server.api.protocol import SamplingFields
from server.api.state import ServerState
from server.api.tracing import tracer
from server.api.structured import FREE_TEXT, OutputFormat
from server.engine.engine import EngineStopped, QueueFull
from server.engine.sampling import SamplingParams
from server.engine.sequence import Sequence, SequenceSpec
from server.metrics import MIXTURE_LABEL
from server.tenants.principal import principal_of


@dataclass
class Call:
    """One accepted request on its way through the engine: one Sequence per choice (`n`)."""

    completion_id: str
    created: int
    route: Route
    params: SamplingParams
    seqs: list[Sequence]
    outputs: asyncio.Queue  # (choice index, EngineOutput), or None when the client has gone
    outcome: RequestOutcome  # what the request-outcome middleware counts and logs
    replica: str | None = None  # the engine replica of its first choice (Ray Serve); None: this process
    members: list = field(default_factory=list)  # (record, weight) of the experts whose weights serve it
    sources: list = field(default_factory=list)  # the records whose stops and defaults apply
    blended: bool = False  # several experts, or one at a weight other than 1

    def cancel(self, engine) -> None:
        for seq in self.seqs:
            engine.cancel(seq)


def _check_room(prompt_len: int, requested: int | None, param: str, prompt_param: str, context_window: int) -> None:
    if context_window - prompt_len < 1:
        raise APIError(
            400,
            f"The prompt is {prompt_len} tokens, which leaves no room in the context window of "
            f"{context_window} tokens.",
            param=prompt_param,
            code="context_length_exceeded",
        )
    if requested is not None and prompt_len + requested > context_window:
        raise APIError(
            400,
            f"The prompt ({prompt_len} tokens) plus {param} ({requested}) is {prompt_len + requested} tokens, "
            f"over the context window of {context_window} tokens. Shorten the prompt or lower {param}.",
            param=param,
            code="context_length_exceeded",
        )


def check_prompt_chars(chars: int, param: str, state: ServerState) -> None:
    """Refuse, before tokenizing, a prompt that has too many characters to fit the context window."""
    base = state.base
    at_least = base.prompts.min_tokens(chars)
    if at_least >= base.context_window:
        raise APIError(400, f"The prompt is {chars} characters, at least {at_least} tokens, over the context window "
                            f"of {base.context_window} tokens.", param=param, code="context_length_exceeded")


def sampling_params(req: SamplingFields, prompt_len: int, state: ServerState, record: AdapterRecord | None,
                    default_max_tokens: int | None = None) -> SamplingParams:
    """The request's sampling, with the expert's defaults under it; 400 for what cannot be served."""
    settings, base = state.settings, state.base
    defaults = record.defaults if record else {}
    requested, param = req.requested_max_tokens()
    _check_room(prompt_len, requested, param, req.PROMPT_PARAM, base.context_window)
    room = base.context_window - prompt_len
    default_budget = defaults.get("max_tokens", default_max_tokens or settings.default_max_tokens)
    max_tokens = min(requested if requested is not None else default_budget, settings.max_tokens_limit, room)
    extra_ids = frozenset(req.stop_token_ids or ())
    check_token_ids(extra_ids, base.vocab_size, "stop_token_ids")
    logprobs, top_logprobs = req.logprob_request()
    logit_bias = {int(token): value for token, value in (req.logit_bias or {}).items()}
    check_token_ids(logit_bias, base.vocab_size, "logit_bias")
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=defaults.get("temperature", 1.0) if req.temperature is None else req.temperature,
        top_p=defaults.get("top_p", 1.0) if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=list(record.stop if record else ()) + req.stop_list(),
        stop_token_ids=extra_ids,
        ignore_eos=req.ignore_eos,
        presence_penalty=req.presence_penalty or 0.0,
        frequency_penalty=req.frequency_penalty or 0.0,
        logit_bias=logit_bias,
        logprobs=logprobs,
        top_logprobs=top_logprobs,
    )


async def route_request(model: str, routing_text: str, request: Request, state: ServerState,
                        top_k: int | None = None) -> Route:
    """The route; an unregistered name that an adapter source may resolve is fetched first (a fetch of it
    already under way is joined; one that fails raises its AdmissionError, answered as it is). Only among the
    experts the caller may use: another tenant's answers as if it were not registered."""
    router, header = state.router, request.headers.get("x-expert")
    principal = principal_of(request.scope)
    visible = state.experts.visible(principal)
    with tracer().start_as_current_span("router decision") as span:
        if router.needs_classifier(model, header):
            with state.metrics.router_latency.time():
                route = await state.in_text_pool(router.by_prompt, routing_text, top_k, visible)
        else:
            fetched: set[str] = set()
            while True:  # a mixture's members are fetched one after another, each at most once
                try:
                    route = router.by_name(model, header, visible)  # after a miss: just fetched, most recently used
                    break
                except (UnknownExpert, UnknownMember) as exc:
                    if exc.name in fetched or state.registry.get(exc.name) is not None:
                        raise  # fetched and gone again, or another tenant's ref: as if absent, and never fetched
                    fetching = state.experts.fetch(exc.name, exc.param, principal.owner)
                    if fetching is None:
                        raise
                    fetched.add(exc.name)
                    with tracer().start_as_current_span("adapter fetch", attributes={"loraplex.expert": exc.name}):
                        # shielded: a client that leaves stops waiting, never the fetch other requests may share
                        await asyncio.shield(asyncio.wrap_future(fetching))
        if span.is_recording():
            span.set_attributes({"loraplex.expert": route.model, "loraplex.router.source": route.source,
                                 **({"loraplex.router.score": route.score} if route.score is not None else {}),
                                 **({"loraplex.router.margin": route.margin} if route.margin is not None else {})})
    state.experts.touch(name for name, _ in route.mixture or ((route.expert, 1.0),) if name)
    return route


def _members(route: Route, state: ServerState,
             tenant: str | None) -> tuple[list[tuple[AdapterRecord, float]], list[AdapterRecord]]:
    """(the experts whose weights serve, with their weights, heaviest first; the records whose stops and
    defaults apply, the first one's defaults). A registered mixture stands for its members and brings its
    own stops and defaults. UnknownExpert / 404 if an expert was retired between routing and here."""
    if route.mixture:
        pairs = route.mixture
    else:
        pairs = ((route.expert, 1.0),) if route.expert else ()
    weights: dict[str, float] = {}
    named: list[AdapterRecord] = []
    for name, weight in pairs:
        record = state.registry.get(name)
        if record is None:
            raise UnknownExpert(route.model, "model")
        named.append(record)
        for member, share in record.mixture or ((name, 1.0),):
            weights[member] = weights.get(member, 0.0) + weight * share
    members = []
    for name, weight in sorted(weights.items(), key=lambda p: (-p[1], p[0])):
        record = state.registry.get(name)
        if record is None:
            raise APIError(404, f"The mixture '{route.model}' blends '{shown(name, tenant)}', which is no longer "
                                "registered.",
                           param="model", code="model_not_found")
        members.append((record, weight))
    # a registered mixture's own stops and defaults first, then its members'
    sources = [r for r in named if r.mixture] + [r for r, _ in members]
    return members, sources


async def submit(req: SamplingFields, prompt_ids: list[int], routing_text: str, request: Request,
                 state: ServerState, id_prefix: str, default_max_tokens: int | None = None,
                 output: OutputFormat = FREE_TEXT) -> Call:
    """Route and queue a request whose prompt is tokenized (the endpoint checked readiness first).
    `output`: the format every choice's answer must have (structured outputs)."""
    constraints = ([None] * req.n if output.grammar is None  # free text: no matchers, no thread hop
                   else await state.in_text_pool(state.base.formats.constraints, output, req.n))
    if state.draining:
        raise APIError(503, "The server is shutting down.", code="shutting_down", headers={"Retry-After": "5"})
    if req.n > state.settings.max_queued_requests:
        raise APIError(400, f"n ({req.n}) is more than this server ever queues at once "
                            f"({state.settings.max_queued_requests}); ask for fewer choices.", param="n")
    # the experts it names are not evicted from the cache of fetched experts until the engine has the request
    with state.experts.pinned(req.model, request.headers.get("x-expert"), owner=principal_of(request.scope).owner):
        call = await _route_and_queue(req, prompt_ids, routing_text, request, state, id_prefix, default_max_tokens,
                                      output, constraints)
    for source in {r.ref for r in call.sources if r.mixture}:
        state.registry.count_request(source)
    for member, _ in call.members:
        state.registry.count_request(member.ref)
        if call.blended:
            state.metrics.mixture_requests.labels(member.ref).inc()
    if state.replicas is not None:  # Ray Serve: the replica is named in the response headers
        try:
            call.replica = await state.replicas.placed(call.seqs[0])
        except BaseException:  # the request was cancelled (its client left) while a replica was being chosen
            call.cancel(state.engine)
            raise
    return call


async def _route_and_queue(req: SamplingFields, prompt_ids: list[int], routing_text: str, request: Request,
                           state: ServerState, id_prefix: str, default_max_tokens: int | None,
                           output: OutputFormat, constraints: list) -> Call:
    """Route the request (fetching its expert if a source has it), set its sampling, queue its choices."""
    base = state.base
    route = await route_request(req.model, routing_text, request, state, req.router_top_k)
    # a mixture a request spelled out is counted under one label, never its own string (see server/metrics.py)
    # (an expert by its ref: two tenants' experts of one name are two series)
    label = state.metrics.label(MIXTURE_LABEL if route.mixture else route.expert or route.model)
    state.metrics.router_decisions.labels(route.source, label).inc()
    outcome = outcome_of(request.scope)
    outcome.model, outcome.label, outcome.source = route.model, label, route.source
    members, sources = _members(route, state, principal_of(request.scope).tenant)
    # the lead's sampling defaults apply: a registered mixture's own, else the heaviest expert's
    mixtures = [r for r in sources if r.mixture and r.defaults]
    lead = mixtures[0] if mixtures else members[0][0] if members else None
    params = sampling_params(req, len(prompt_ids), state, lead, default_max_tokens)
    if not params.ignore_eos:  # free text in a loop ends; a constrained answer is steered off (server/engine/loops.py)
        params.loop_tokens = state.settings.loop_stop_tokens
    for other in sources:  # a mixture stops where any of its experts would
        params.stop += [text for text in other.stop if text not in params.stop]
    # ends a turn: EOS and the template's end-of-turn token (unless ignore_eos), the experts'
    # own stop tokens, and the request's stop_token_ids
    stop_ids = params.stop_token_ids.union(*(source.stop_token_ids for source in sources))
    record = members[0][0] if members else None
    blended = len(members) > 1 or (bool(members) and members[0][1] != 1.0)
    if not params.ignore_eos:
        stop_ids |= base.stop_token_ids
    loop = asyncio.get_running_loop()
    outputs: asyncio.Queue = asyncio.Queue()
    request_id = request.scope.get("state", {}).get("request_id", uuid.uuid4().hex)

    def emitter(index: int):
        return lambda out: loop.call_soon_threadsafe(outputs.put_nowait, (index, out))

    specs = [
        SequenceSpec(
            request_id=request_id if req.n == 1 else f"{request_id}-{index}",
            prompt_ids=prompt_ids,
            adapter_key=record.key if record else None,
            adapter_mix=tuple((member.key, weight) for member, weight in members) if blended else (),
            model=label,
            params=params,
            stop_token_ids=stop_ids,
            # choice i of a seeded request draws from seed + i: reproducible, and the choices differ
            seed=secrets.randbits(63) if params.seed is None else params.seed + index,
            grammar=output.grammar,
            tenant=principal_of(request.scope).tenant or "",
            priority=req.priority,  # a batch line's already has batch_priority added
        )
        for index in range(req.n)
    ]
    seqs = [spec.build(emitter(index), state.engine.device, constraints[index]) for index, spec in enumerate(specs)]
    call = Call(f"{id_prefix}-{uuid.uuid4().hex}", int(time.time()), route, params, seqs, outputs, outcome,
                members=members, sources=sources, blended=blended)
    try:
        for seq in seqs:
            state.engine.submit(seq)
    except (QueueFull, EngineStopped) as exc:
        call.cancel(state.engine)  # the choices already queued go too
        if isinstance(exc, QueueFull):
            raise APIError(429, "Too many requests are queued; retry shortly.", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        raise APIError(503, "The server is shutting down.", code="shutting_down") from None
    return call
