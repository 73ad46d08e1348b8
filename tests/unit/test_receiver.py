"""The embedded OTLP receiver, driven by the real OpenTelemetry SDK exporters over loopback.

The SDK's own exporters are the clients on purpose: the receiver is only useful if what a
traced program really sends arrives complete, and a hand-built client would share our bugs.
"""

from __future__ import annotations

import faulthandler
import gzip
import http.client
import json
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from types import FrameType
from typing import Any
from urllib.parse import urlsplit

import grpc
import pytest
import requests
from google.rpc import status_pb2
from ollama_tracer.collectors.otlp_convert import MAX_REQUEST_BYTES, SpanDict, spans_from_request
from ollama_tracer.collectors.otlp_receiver import OtlpReceiver
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcSpanExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpSpanExporter
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1 import common_pb2
from opentelemetry.proto.trace.v1 import trace_pb2
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter
from opentelemetry.trace import SpanKind, Status, StatusCode

TEST_TIMEOUT_S = 60
PROTOCOLS = ["http", "grpc"]
BURST_SPANS = 20_000
PROTOBUF = {"Content-Type": "application/x-protobuf"}
EXPORT_METHOD = "/opentelemetry.proto.collector.trace.v1.TraceService/Export"


@pytest.fixture(autouse=True)
def timeout_guard() -> Iterator[None]:
    """A hung socket must fail one test, not stall the whole suite."""

    def on_alarm(signum: int, frame: FrameType | None) -> None:
        raise TimeoutError(f"test exceeded {TEST_TIMEOUT_S} s")

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.alarm(TEST_TIMEOUT_S)
    # Backstop for a hang inside C code, where the alarm's Python handler never gets to run.
    faulthandler.dump_traceback_later(TEST_TIMEOUT_S + 30, exit=True)
    try:
        yield
    finally:
        signal.alarm(0)
        faulthandler.cancel_dump_traceback_later()
        signal.signal(signal.SIGALRM, previous)


@pytest.fixture(autouse=True)
def loopback_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exporters read OTEL_* and proxy variables; a developer's shell must not redirect them."""
    for name in list(os.environ):
        if name.startswith("OTEL_") or name.lower() in {
            "http_proxy",
            "https_proxy",
            "all_proxy",
            "grpc_proxy",
        }:
            monkeypatch.delenv(name)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    monkeypatch.setenv("no_proxy", "127.0.0.1,localhost")


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    with OtlpReceiver() as running:
        yield running


def make_exporter(receiver: OtlpReceiver, protocol: str) -> SpanExporter:
    if protocol == "http":
        return HttpSpanExporter(endpoint=f"{receiver.http_endpoint}/v1/traces", timeout=10)
    return GrpcSpanExporter(endpoint=receiver.grpc_endpoint, insecure=True, timeout=10)


def make_provider(exporter: SpanExporter) -> TracerProvider:
    # The default queue (2048) drops spans in bursts; a capture sizes it for the whole run.
    provider = TracerProvider(
        resource=Resource.create({"service.name": "receiver-test", "deployment.environment": "unit"})
    )
    provider.add_span_processor(BatchSpanProcessor(exporter, max_queue_size=65536, schedule_delay_millis=50))
    return provider


def flush_and_shutdown(provider: TracerProvider) -> None:
    assert provider.force_flush(timeout_millis=30_000)
    provider.shutdown()


def export_one_span(receiver: OtlpReceiver, protocol: str, name: str) -> None:
    provider = make_provider(make_exporter(receiver, protocol))
    provider.get_tracer("receiver-test").start_span(name).end()
    flush_and_shutdown(provider)


def request_with(*spans: Any) -> Any:
    request = trace_service_pb2.ExportTraceServiceRequest()
    resource_spans = request.resource_spans.add()
    resource_spans.resource.attributes.add(key="service.name", value=common_pb2.AnyValue(string_value="hand"))
    resource_spans.scope_spans.add().spans.extend(spans)
    return request


def valid_span(name: str, span_id: bytes = b"\x01" * 8) -> Any:
    return trace_pb2.Span(
        trace_id=b"\xab" * 16, span_id=span_id, name=name, start_time_unix_nano=1, end_time_unix_nano=2
    )


def grpc_target(receiver: OtlpReceiver) -> str:
    return urlsplit(receiver.grpc_endpoint).netloc


# --------------------------------------------------------------------------------------------
# Round trips with the real SDK
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_round_trip_keeps_parentage_attributes_events_and_status(
    receiver: OtlpReceiver, protocol: str
) -> None:
    provider = make_provider(make_exporter(receiver, protocol))
    tracer = provider.get_tracer("receiver-test")
    parent_attributes = {
        "http.method": "POST",
        "retries": 3,
        "ratio": 0.5,
        "streamed": True,
        "stages": ["a", "b"],
    }
    with (
        tracer.start_as_current_span("request", kind=SpanKind.SERVER, attributes=parent_attributes) as parent,
        tracer.start_as_current_span("load_model") as child,
    ):
        child.add_event("first_token", {"token.index": 0})
        child.set_status(Status(StatusCode.ERROR, "model busy"))
    flush_and_shutdown(provider)

    spans = {span["name"]: span for span in receiver.spans()}
    assert set(spans) == {"request", "load_model"}
    request, load_model = spans["request"], spans["load_model"]
    parent_context, child_context = parent.get_span_context(), child.get_span_context()

    assert request["traceId"] == load_model["traceId"] == format(parent_context.trace_id, "032x")
    assert request["spanId"] == format(parent_context.span_id, "016x")
    assert request["parentSpanId"] == ""
    assert load_model["spanId"] == format(child_context.span_id, "016x")
    assert load_model["parentSpanId"] == request["spanId"]

    assert request["kind"] == trace_pb2.Span.SPAN_KIND_SERVER
    assert load_model["kind"] == trace_pb2.Span.SPAN_KIND_INTERNAL
    assert request["attributes"] == parent_attributes
    assert request["status"] == {"code": trace_pb2.Status.STATUS_CODE_UNSET, "message": ""}
    assert load_model["status"] == {"code": trace_pb2.Status.STATUS_CODE_ERROR, "message": "model busy"}
    assert request["startTimeUnixNano"] <= load_model["startTimeUnixNano"]
    assert load_model["endTimeUnixNano"] <= request["endTimeUnixNano"]

    [event] = load_model["events"]
    assert event["name"] == "first_token"
    assert event["attributes"] == {"token.index": 0}
    assert load_model["startTimeUnixNano"] <= event["timeUnixNano"] <= load_model["endTimeUnixNano"]

    for span in (request, load_model):
        assert span["service"] == "receiver-test"
        assert span["resource"]["service.name"] == "receiver-test"
        assert span["resource"]["deployment.environment"] == "unit"
        assert isinstance(span["startTimeUnixNano"], int)
        json.dumps(span)  # spans.jsonl must be able to write every span as it is

    stats = receiver.stats()
    assert stats["received_spans"] == 2
    assert stats["rejected_requests"] == 0


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_burst_of_20000_spans_arrives_complete(
    receiver: OtlpReceiver, protocol: str, record_property: Any, capsys: pytest.CaptureFixture[str]
) -> None:
    provider = make_provider(make_exporter(receiver, protocol))
    tracer = provider.get_tracer("receiver-test")
    started = time.perf_counter()
    for index in range(BURST_SPANS):
        tracer.start_span("burst", attributes={"index": index}).end()
    created = time.perf_counter()
    flush_and_shutdown(provider)
    arrived = time.perf_counter()

    record_property("burst_create_s", round(created - started, 3))
    record_property("burst_total_s", round(arrived - started, 3))
    with capsys.disabled():
        print(
            f"\n{protocol}: {BURST_SPANS} spans created in {created - started:.2f} s, "
            f"all received {arrived - started:.2f} s after the first"
        )

    stats = receiver.stats()
    assert stats["received_spans"] == BURST_SPANS
    assert stats["rejected_requests"] == 0
    spans = receiver.spans()
    assert len({span["spanId"] for span in spans}) == BURST_SPANS
    assert sorted(span["attributes"]["index"] for span in spans) == list(range(BURST_SPANS))


def test_otlp_json_is_accepted_with_hex_ids(receiver: OtlpReceiver) -> None:
    document = {
        "resourceSpans": [
            {
                "resource": {"attributes": [{"key": "service.name", "value": {"stringValue": "curl"}}]},
                "scopeSpans": [
                    {
                        "spans": [
                            {
                                "traceId": "5b8efff798038103d269b633813fc60c",
                                "spanId": "eee19b7ec3c1b174",
                                "parentSpanId": "eee19b7ec3c1b173",
                                "name": "json-span",
                                "kind": 3,
                                "startTimeUnixNano": "1544712660000000000",
                                "endTimeUnixNano": "1544712661000000000",
                                "attributes": [{"key": "n", "value": {"intValue": "7"}}],
                                "someFutureField": True,
                            }
                        ]
                    }
                ],
            }
        ]
    }
    response = requests.post(f"{receiver.http_endpoint}/v1/traces", json=document, timeout=10)

    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    assert response.json() == {}
    [span] = receiver.spans()
    assert span["traceId"] == "5b8efff798038103d269b633813fc60c"
    assert span["spanId"] == "eee19b7ec3c1b174"
    assert span["parentSpanId"] == "eee19b7ec3c1b173"
    assert span["kind"] == 3
    assert span["startTimeUnixNano"] == 1544712660000000000
    assert span["attributes"] == {"n": 7}
    assert span["service"] == "curl"


def test_gzip_bodies_are_accepted(receiver: OtlpReceiver) -> None:
    body = gzip.compress(request_with(valid_span("zipped")).SerializeToString())
    response = requests.post(
        f"{receiver.http_endpoint}/v1/traces",
        data=body,
        headers={**PROTOBUF, "Content-Encoding": "gzip"},
        timeout=10,
    )

    assert response.status_code == 200
    assert [span["name"] for span in receiver.spans()] == ["zipped"]


def test_spans_from_request_converts_every_attribute_value_kind() -> None:
    span = valid_span("values")
    span.attributes.add(key="bytes", value=common_pb2.AnyValue(bytes_value=b"\x00\xff"))
    span.attributes.add(key="unset", value=common_pb2.AnyValue())
    nested = common_pb2.AnyValue()
    nested.kvlist_value.values.add(key="inner", value=common_pb2.AnyValue(double_value=1.5))
    nested.kvlist_value.values.add(key="list", value=common_pb2.AnyValue()).value.array_value.values.add(
        bool_value=False
    )
    span.attributes.add(key="nested", value=nested)

    [converted] = spans_from_request(request_with(span))

    assert converted["attributes"] == {
        "bytes": "AP8=",
        "unset": None,
        "nested": {"inner": 1.5, "list": [False]},
    }
    assert converted["service"] == "hand"
    assert converted["events"] == []


# --------------------------------------------------------------------------------------------
# Refusals: answered, counted, and the receiver keeps going
# --------------------------------------------------------------------------------------------


def test_malformed_http_requests_get_4xx_and_the_receiver_keeps_working(receiver: OtlpReceiver) -> None:
    url = f"{receiver.http_endpoint}/v1/traces"

    def post(data: bytes, headers: dict[str, str], target: str = url) -> requests.Response:
        return requests.post(target, data=data, headers=headers, timeout=10)

    garbage = post(b"\xff\xfe this is not protobuf", PROTOBUF)
    bad_json = post(b"{not json", {"Content-Type": "application/json"})
    bad_gzip = post(b"not gzip at all", {**PROTOBUF, "Content-Encoding": "gzip"})
    gzip_bomb = post(gzip.compress(b"\0" * (MAX_REQUEST_BYTES + 1)), {**PROTOBUF, "Content-Encoding": "gzip"})
    wrong_path = post(b"", PROTOBUF, f"{receiver.http_endpoint}/v1/metrics")
    wrong_type = post(b"hello", {"Content-Type": "text/plain"})
    wrong_encoding = post(b"", {**PROTOBUF, "Content-Encoding": "br"})
    wrong_method = requests.get(url, timeout=10)

    assert garbage.status_code == 400
    assert status_pb2.Status.FromString(garbage.content).code == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad_json.status_code == 400
    assert bad_json.json()["code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert bad_gzip.status_code == 400
    assert gzip_bomb.status_code == 413
    assert wrong_path.status_code == 404
    assert wrong_type.status_code == 415
    assert wrong_encoding.status_code == 415
    assert wrong_method.status_code == 405
    assert wrong_method.headers["Allow"] == "POST"

    export_one_span(receiver, "http", "after-garbage")

    assert [span["name"] for span in receiver.spans()] == ["after-garbage"]
    assert receiver.stats() == {
        "received_requests": 1,
        "received_spans": 1,
        "rejected_requests": 8,
        "rejected_spans": 0,
        "dropped_spans": 0,
        "reasons": {
            "malformed_protobuf": 1,
            "malformed_json": 1,
            "malformed_gzip": 1,
            "payload_too_large": 1,
            "not_found": 1,
            "unsupported_media_type": 1,
            "unsupported_encoding": 1,
            "method_not_allowed": 1,
        },
    }


def test_oversize_body_is_refused_before_it_is_read(receiver: OtlpReceiver) -> None:
    # Only the header is sent: the receiver must answer from Content-Length alone.
    connection = http.client.HTTPConnection(urlsplit(receiver.http_endpoint).netloc, timeout=10)
    connection.putrequest("POST", "/v1/traces")
    connection.putheader("Content-Type", "application/x-protobuf")
    connection.putheader("Content-Length", str(MAX_REQUEST_BYTES + 1))
    connection.endheaders()
    response = connection.getresponse()
    connection.close()

    assert response.status == 413
    assert receiver.stats()["reasons"] == {"payload_too_large": 1}
    export_one_span(receiver, "http", "after-oversize")
    assert receiver.stats()["received_spans"] == 1


def test_malformed_grpc_request_gets_invalid_argument(receiver: OtlpReceiver) -> None:
    with grpc.insecure_channel(grpc_target(receiver)) as channel:
        export_raw_bytes = channel.unary_unary(EXPORT_METHOD)
        with pytest.raises(grpc.RpcError) as refused:
            export_raw_bytes(b"\xff\xfe this is not protobuf", timeout=10)

    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert receiver.stats()["reasons"] == {"malformed_protobuf": 1}
    export_one_span(receiver, "grpc", "after-garbage")
    assert [span["name"] for span in receiver.spans()] == ["after-garbage"]


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_spans_with_invalid_ids_are_reported_as_partial_success(
    receiver: OtlpReceiver, protocol: str
) -> None:
    bad_span = trace_pb2.Span(trace_id=b"\x01\x02", span_id=b"\x01" * 8, name="short-trace-id")
    request = request_with(valid_span("good"), bad_span)

    if protocol == "http":
        reply = requests.post(
            f"{receiver.http_endpoint}/v1/traces",
            data=request.SerializeToString(),
            headers=PROTOBUF,
            timeout=10,
        )
        assert reply.status_code == 200
        response = trace_service_pb2.ExportTraceServiceResponse.FromString(reply.content)
    else:
        with grpc.insecure_channel(grpc_target(receiver)) as channel:
            response = trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, timeout=10)

    assert response.partial_success.rejected_spans == 1
    assert "traceId" in response.partial_success.error_message
    assert [span["name"] for span in receiver.spans()] == ["good"]
    stats = receiver.stats()
    assert (stats["received_spans"], stats["rejected_spans"]) == (1, 1)
    assert stats["reasons"] == {"invalid_span_id": 1}


def test_sink_failure_is_reported_to_the_client_and_counted() -> None:
    delivered: list[SpanDict] = []

    failures = [OSError("disk full")]

    def flaky_sink(spans: list[SpanDict]) -> None:
        if failures:
            raise failures.pop()
        delivered.extend(spans)

    body = request_with(valid_span("span")).SerializeToString()
    with OtlpReceiver(on_spans=flaky_sink) as receiver:
        url = f"{receiver.http_endpoint}/v1/traces"
        first = requests.post(url, data=body, headers=PROTOBUF, timeout=10)
        second = requests.post(url, data=body, headers=PROTOBUF, timeout=10)
        stats = receiver.stats()

    assert (first.status_code, second.status_code) == (500, 200)
    assert len(delivered) == 1
    assert stats["dropped_spans"] == 1
    assert stats["received_spans"] == 1
    assert stats["reasons"] == {"sink_error": 1}


def test_sink_is_never_called_concurrently() -> None:
    inside = threading.Lock()
    overlaps: list[int] = []
    delivered: list[SpanDict] = []

    def slow_sink(spans: list[SpanDict]) -> None:
        if not inside.acquire(blocking=False):
            overlaps.append(1)
            return
        try:
            time.sleep(0.002)
            delivered.extend(spans)
        finally:
            inside.release()

    with OtlpReceiver(on_spans=slow_sink) as receiver:
        url = f"{receiver.http_endpoint}/v1/traces"

        def client(worker: int) -> None:
            with requests.Session() as session:
                for attempt in range(10):
                    span = valid_span("c", span_id=bytes([worker + 1, attempt + 1]) * 4)
                    body = request_with(span).SerializeToString()
                    assert session.post(url, data=body, headers=PROTOBUF, timeout=10).status_code == 200

        clients = [threading.Thread(target=client, args=(worker,)) for worker in range(6)]
        for thread in clients:
            thread.start()
        for thread in clients:
            thread.join()

    assert overlaps == []
    assert len(delivered) == 60


# --------------------------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------------------------


def test_stop_is_prompt_releases_both_ports_and_is_idempotent() -> None:
    receiver = OtlpReceiver()
    with pytest.raises(RuntimeError):
        _ = receiver.http_endpoint
    receiver.start()
    with pytest.raises(RuntimeError):
        receiver.start()
    ports = [urlsplit(receiver.http_endpoint).port, urlsplit(receiver.grpc_endpoint).port]
    assert all(isinstance(port, int) and port > 0 for port in ports)
    assert (
        urlsplit(receiver.http_endpoint).hostname == urlsplit(receiver.grpc_endpoint).hostname == "127.0.0.1"
    )

    # Idle keep-alive clients on both protocols must not hold stop() up.
    session = requests.Session()
    empty = trace_service_pb2.ExportTraceServiceRequest().SerializeToString()
    assert (
        session.post(f"{receiver.http_endpoint}/v1/traces", data=empty, headers=PROTOBUF).status_code == 200
    )
    channel = grpc.insecure_channel(grpc_target(receiver))
    trace_service_pb2_grpc.TraceServiceStub(channel).Export(
        trace_service_pb2.ExportTraceServiceRequest(), timeout=10
    )

    started = time.monotonic()
    receiver.stop()
    assert time.monotonic() - started < 5
    receiver.stop()

    for port in ports:
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        with socket.socket() as rebind:
            # SO_REUSEADDR as any server sets it: connections we closed may linger in TIME_WAIT.
            rebind.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            rebind.bind(("127.0.0.1", port))
            rebind.listen()
    assert [thread.name for thread in threading.enumerate() if thread.name.startswith("otlp-")] == []
    with pytest.raises(requests.ConnectionError):
        session.post(f"{receiver.http_endpoint}/v1/traces", data=empty, headers=PROTOBUF, timeout=5)
    session.close()
    channel.close()
    assert receiver.stats()["received_requests"] == 2


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_stop_waits_for_requests_already_in_flight(protocol: str) -> None:
    sink_entered, release_sink = threading.Event(), threading.Event()
    delivered: list[SpanDict] = []

    def blocking_sink(spans: list[SpanDict]) -> None:
        sink_entered.set()
        release_sink.wait(10)
        delivered.extend(spans)

    receiver = OtlpReceiver(on_spans=blocking_sink)
    receiver.start()
    request = request_with(valid_span("in-flight"))
    outcome: list[Any] = []

    def send() -> None:
        if protocol == "http":
            reply = requests.post(
                f"{receiver.http_endpoint}/v1/traces", data=request.SerializeToString(), headers=PROTOBUF
            )
            outcome.append(reply.status_code)
        else:
            with grpc.insecure_channel(grpc_target(receiver)) as channel:
                trace_service_pb2_grpc.TraceServiceStub(channel).Export(request, timeout=10)
            outcome.append("ok")

    sender = threading.Thread(target=send)
    sender.start()
    assert sink_entered.wait(10)
    stopper = threading.Thread(target=receiver.stop)
    stopper.start()
    stopper.join(0.5)
    assert stopper.is_alive(), "stop() returned while a request was still in the sink"

    release_sink.set()
    stopper.join(10)
    sender.join(10)
    assert not stopper.is_alive()
    assert outcome == [200] if protocol == "http" else outcome == ["ok"]
    assert [span["name"] for span in delivered] == ["in-flight"]
    assert receiver.stats()["received_spans"] == 1
