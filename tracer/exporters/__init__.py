"""Exporters: each output format is one module with ``render(outfile, data)`` (memray's reporter
protocol), writing to a file-like object so that a test renders into ``StringIO``.

``write_outputs`` writes every file exporter's output into a capture directory, in one loop.
Adding a format: one module with a ``render`` function, and one line in ``FILE_EXPORTERS``.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path
from typing import Generic, Protocol, TextIO, TypeVar

from ollama_tracer import capture_files
from ollama_tracer.attribution.analysis import ExportData

Data = TypeVar("Data", contravariant=True)


class Exporter(Protocol, Generic[Data]):
    """Writes one view of ``data`` (an attribution, a diff, a benchmark's result) to ``outfile``."""

    def __call__(self, outfile: TextIO, data: Data, /) -> None: ...


def file_exporters() -> list[tuple[str, Exporter[ExportData]]]:
    """The files every capture directory gets, each from one exporter."""
    from ollama_tracer.exporters import attribution_json, html, perfetto, spans_jsonl

    return [(capture_files.ATTRIBUTION_JSON, attribution_json.render), (capture_files.SPANS_JSONL, spans_jsonl.render),
            (capture_files.PERFETTO_JSON, perfetto.render), (capture_files.REPORT_HTML, html.render)]


def write_rendered(path: Path, render: Callable[[TextIO, ExportData], None], data: ExportData) -> Path:
    """Render into ``path`` atomically, user-only (0600), like every file of a capture."""
    buffer = io.StringIO()
    render(buffer, data)
    capture_files.write_text(path, buffer.getvalue())
    return path


def write_outputs(directory: Path, data: ExportData) -> list[Path]:
    """capture.json (with the per-request evidence) and every file exporter's output."""
    meta = dict(data.meta, evidence=data.attribution.get("evidence", {}))
    capture_files.write_json(directory / capture_files.CAPTURE_JSON, meta)
    data = ExportData(meta, data.attribution, data.spans, data.evidence)
    return [write_rendered(directory / name, render, data) for name, render in file_exporters()]
