"""Client spans: an OTLP receiver embedded in the capture; the child exports to it over loopback."""

from __future__ import annotations

from typing import Any

from ollama_tracer.capture_files import CLIENT_SPANS, JsonlAppender
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.otlp_receiver import OtlpReceiver


class OtlpCollector:
    name = "client_spans"

    def __init__(self, protocol: str = "grpc") -> None:
        self.protocol = protocol
        self._receiver: OtlpReceiver | None = None
        self._out: JsonlAppender | None = None

    def available(self) -> tuple[bool, str]:
        return True, ""

    def start(self, session: SessionInfo) -> None:
        self._out = JsonlAppender(session.directory / CLIENT_SPANS)
        self._receiver = OtlpReceiver(on_spans=self._out.append)
        self._receiver.start()
        endpoint = self._receiver.grpc_endpoint if self.protocol == "grpc" else self._receiver.http_endpoint
        session.child_env["OTEL_EXPORTER_OTLP_ENDPOINT"] = endpoint
        session.child_env["OTEL_EXPORTER_OTLP_PROTOCOL"] = self.protocol

    def child_started(self, pid: int) -> None:
        pass

    def stop(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self._receiver is not None:
            self._receiver.stop()
            stats = self._receiver.stats()
        if self._out is not None:
            self._out.close()
            stats["written_spans"] = self._out.rows - self._out.lost
            stats.update(self._out.stats())
        return stats
