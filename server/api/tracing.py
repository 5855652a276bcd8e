"""OpenTelemetry spans of a completion request's work, inside the request's span.

The request's span itself (kind SERVER, a child of the caller's W3C `traceparent`) and the spans of its
endpoint are FastAPI's own telemetry (FastAPI 0.16x traces requests natively once a tracer provider is set):
we add the router's decision, an adapter fetched from a source, and the engine's phases of the first
choice (queue wait, prefill, decode, with token counts), and a `stream end` event when the last choice
finishes. The engine thread never traces: its phases are the request's own timestamps
(Sequence.arrival/admitted/first_token/finish_time), turned into spans at the edge once the request has
finished, so the decode loop pays nothing for tracing.

Off unless an exporter is configured (server/startup/tracing.py reads the standard OTEL_* variables): the
API's default tracer then makes non-recording spans, FastAPI skips its own, and nothing is recorded or sent.
"""
from __future__ import annotations

import time

from opentelemetry import trace

TRACER_NAME = "loraplex"


def tracer() -> trace.Tracer:
    return trace.get_tracer(TRACER_NAME)


def _epoch_ns(offset: int, monotonic_s: float) -> int:
    return int(monotonic_s * 1e9) + offset


def record_phases(seq, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> None:
    """The engine phases of a finished request (its first choice) as children of the current span, and the
    `stream end` event on it."""
    parent = trace.get_current_span()
    if not parent.is_recording():
        return
    parent.add_event("stream end", {"gen_ai.usage.input_tokens": prompt_tokens,
                                    "gen_ai.usage.output_tokens": completion_tokens})
    offset = time.time_ns() - time.monotonic_ns()
    context = trace.set_span_in_context(parent)
    phases = [("queue wait", seq.arrival_time, seq.admitted_time, {}),
              ("prefill", seq.admitted_time, seq.first_token_time,
               {"gen_ai.usage.input_tokens": prompt_tokens, "loraplex.cached_tokens": cached_tokens}),
              ("decode", seq.first_token_time, seq.finish_time, {"gen_ai.usage.output_tokens": completion_tokens})]
    for name, start, end, attributes in phases:
        if start is None or end is None:
            continue
        span = tracer().start_span(name, context=context, start_time=_epoch_ns(offset, start), attributes=attributes)
        span.end(end_time=_epoch_ns(offset, end))
