"""Exporters: each speaks `render(outfile, data)`; one module per output format."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from ollama_tracer.correlate import Evidence


@dataclass
class ExportData:
    """Everything an exporter may show, as read from a capture directory."""

    meta: dict[str, Any]  # capture.json: "command", "tracer_version", "clock", "collectors", "exit_code", "drops"
    attribution: dict[str, Any]  # attribution.json ("tracer.attribution/1")
    spans: list[dict[str, Any]]  # spans.jsonl rows (OTLP-JSON-shaped)
    evidence: Evidence | None = None  # GPU samples and stacks, for exporters that draw them


class Exporter(Protocol):
    def render(self, outfile: TextIO, data: ExportData) -> None: ...
