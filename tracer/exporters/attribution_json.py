"""``attribution.json`` (and ``tracer report --format json``): the attribution as one JSON document."""

from __future__ import annotations

from typing import TextIO

from ollama_tracer.attribution.analysis import ExportData
from ollama_tracer.capture_files import json_text


def render(outfile: TextIO, data: ExportData) -> None:
    outfile.write(json_text(data.attribution))
    outfile.write("\n")
