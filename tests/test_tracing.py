"""OpenTelemetry spans of a request, on the real app and engine in-process (tiny Llama), collected by the SDK's
in-memory exporter: the caller's W3C traceparent is continued (by FastAPI's own request span); the router's
decision, the queue wait, the prefill and the decode (with token counts) are inside the request's span,
with a `stream end` event; without a configured provider nothing is recorded."""
from contextlib import contextmanager

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import SpanKind

import server.api.dispatch
import server.api.tracing
from server.startup.tracing import configure_tracing
from tests.support.harness import wait_until

TRACE_ID, PARENT_ID = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"


@pytest.fixture
def provider(monkeypatch):
    """A provider of this test's own, for FastAPI's spans and ours (the process-wide provider stays untouched)."""
    provider = TracerProvider()
    provider.exporter = InMemorySpanExporter()
    provider.add_span_processor(SimpleSpanProcessor(provider.exporter))
    tracer = lambda: provider.get_tracer("loraplex")  # noqa: E731
    monkeypatch.setattr(server.api.tracing, "tracer", tracer)
    monkeypatch.setattr(server.api.dispatch, "tracer", tracer)
    yield provider
    provider.shutdown()


@contextmanager
def traced_app(base_folder, data_dir, provider):
    """tests.support.in_process, with the app built on `provider`."""
    from fastapi.testclient import TestClient

    from server.api.app import create_app
    from server.settings import Settings
    from server.startup.bootstrap import create_state

    state = create_state(Settings(base_model=str(base_folder), quantization="none", compute_dtype="float32",
                                  data_dir=str(data_dir), max_batch_size=2, context_window=256, router="none"))
    state.tracer_provider = provider
    state.engine.start()
    try:
        assert state.engine.ready.wait(180) and wait_until(lambda: state.ready, 30), state.engine.load_error
        with TestClient(create_app(state), raise_server_exceptions=False) as client:
            yield state, client
    finally:
        state.engine.stop(timeout=10)


def test_a_request_continues_the_callers_trace_with_its_phases_as_spans(provider, tiny_folder, tmp_path):
    exporter = provider.exporter
    with traced_app(tiny_folder, tmp_path / "data", provider) as (state, client):
        for stream in (False, True):
            exporter.clear()
            body = {"model": state.base.name, "max_tokens": 5, "ignore_eos": True, "stream": stream,
                    "stream_options": {"include_usage": True} if stream else None,
                    "messages": [{"role": "user", "content": "hello"}]}
            reply = client.post("/v1/chat/completions", json={k: v for k, v in body.items() if v is not None},
                                headers={"traceparent": f"00-{TRACE_ID}-{PARENT_ID}-01"})
            assert reply.status_code == 200, reply.text
            finished = exporter.get_finished_spans()
            spans, by_id = {span.name: span for span in finished}, {span.context.span_id: span for span in finished}

            def ancestors(span):
                while span.parent is not None and span.parent.span_id in by_id:
                    span = by_id[span.parent.span_id]
                    yield span.context.span_id

            [request] = [span for span in finished if span.parent and format(span.parent.span_id, "016x") == PARENT_ID]
            assert request.name == "POST /v1/chat/completions" and request.kind == SpanKind.SERVER
            assert format(request.context.trace_id, "032x") == TRACE_ID
            for name in ("router decision", "queue wait", "prefill", "decode"):
                assert request.context.span_id in set(ancestors(spans[name])), (name, [s.name for s in finished])
            assert spans["router decision"].attributes["loraplex.router.source"] == "base"
            assert spans["decode"].attributes["gen_ai.usage.output_tokens"] == 5
            assert spans["prefill"].attributes["gen_ai.usage.input_tokens"] > 0
            assert spans["queue wait"].end_time <= spans["prefill"].start_time + 1000
            assert spans["prefill"].end_time <= spans["decode"].end_time <= request.end_time
            ended = [event for span in finished for event in span.events if event.name == "stream end"]
            assert [event.attributes["gen_ai.usage.output_tokens"] for event in ended] == [5]
            assert request.attributes["http.response.status_code"] == 200


def test_tracing_is_off_unless_an_exporter_is_configured():
    assert configure_tracing({}) is None
    assert configure_tracing({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318", "OTEL_SDK_DISABLED": "true"}) is None
    assert configure_tracing({"OTEL_TRACES_EXPORTER": "none", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://x:4318"}) is None
    from opentelemetry import trace

    assert not trace.get_tracer("loraplex").start_span("x").is_recording()  # the API's default: nothing recorded
