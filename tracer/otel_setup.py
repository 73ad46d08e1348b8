"""Configure the OpenTelemetry SDK from the standard ``OTEL_*`` variables, or not at all.

With no exporter configured, tracing stays on the API's no-op tracer: spans cost ~0.3 µs and
go nowhere. When an embedding program (or ``tracer capture``'s sitecustomize) has already
installed an SDK provider, that provider is used as is.
"""

from __future__ import annotations

import os

from ollama_tracer.vocabulary import PROCESS_PID, SERVICE_NAME
from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

# The SDK default (2048) drops spans in bursts (reference/tooling-facts.md); a capture must not.
MAX_QUEUE_SIZE = 65_536
MAX_EXPORT_BATCH = 512


def exporter_configured() -> bool:
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    if os.environ.get("OTEL_TRACES_EXPORTER", "otlp").lower() == "none":
        return False
    return bool(
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT")
    )


def make_otlp_exporter(endpoint: str | None = None, protocol: str | None = None) -> SpanExporter:
    """An OTLP span exporter; ``protocol`` is ``grpc`` or ``http/protobuf`` (env default)."""
    protocol = (protocol or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
                or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc")
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        if endpoint is None:
            return GrpcExporter()
        return GrpcExporter(endpoint=endpoint, insecure=endpoint.startswith("http://"))
    if protocol in ("http/protobuf", "http"):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        if endpoint is None:
            return HttpExporter()
        return HttpExporter(endpoint=endpoint.rstrip("/") + "/v1/traces")
    raise ValueError(f"unknown OTLP protocol {protocol!r}; use grpc or http/protobuf")


def configure_from_env(service_name: str) -> TracerProvider | None:
    """Install an SDK provider when the environment asks for export; return it (or None)."""
    current = trace.get_tracer_provider()
    if isinstance(current, TracerProvider):
        return current
    if not exporter_configured():
        return None
    resource = Resource.create({SERVICE_NAME: os.environ.get("OTEL_SERVICE_NAME", service_name),
                                PROCESS_PID: os.getpid()})  # py-spy stacks are matched to it
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(
        BatchSpanProcessor(make_otlp_exporter(), max_queue_size=MAX_QUEUE_SIZE,
                           max_export_batch_size=MAX_EXPORT_BATCH)
    )
    trace.set_tracer_provider(provider)
    return provider
