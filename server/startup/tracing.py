"""Tracing set up from the standard OpenTelemetry environment variables, or left off.

On when OTEL_EXPORTER_OTLP_ENDPOINT or OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, or OTEL_TRACES_EXPORTER
names `otlp` or `console`; off otherwise, and with OTEL_SDK_DISABLED=true or OTEL_TRACES_EXPORTER=none. The
OTLP exporter (HTTP/protobuf) reads its own variables: endpoint, headers, timeout, certificates; batching
follows OTEL_BSP_*; the service is OTEL_SERVICE_NAME (default `loraplex`) with OTEL_RESOURCE_ATTRIBUTES.
"""
from __future__ import annotations

import logging
import os

log = logging.getLogger("loraplex.tracing")


def configure_tracing(environ=os.environ):
    """The SDK's TracerProvider, exporting spans, made the global one; None when tracing is off."""
    exporter = environ.get("OTEL_TRACES_EXPORTER", "").strip().lower()
    endpoint = environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    if environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or exporter == "none" or not (exporter or endpoint):
        return None
    from opentelemetry import trace
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter

    attributes = {} if environ.get("OTEL_SERVICE_NAME") else {"service.name": "loraplex"}
    provider = TracerProvider(resource=Resource.create(attributes))
    if exporter == "console":
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter()))
    else:
        if environ.get("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf") != "http/protobuf":
            log.warning("OTEL_EXPORTER_OTLP_PROTOCOL=%s: this server exports OTLP over HTTP/protobuf only",
                        environ.get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter

        provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    trace.set_tracer_provider(provider)
    log.info("tracing: spans exported (%s)", exporter or f"otlp to {endpoint}")
    return provider
