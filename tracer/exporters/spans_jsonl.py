"""``spans.jsonl``: the client's spans and the attribution's phase spans, one OTLP-JSON-shaped row a line."""

from __future__ import annotations

import json
from typing import TextIO

from ollama_tracer.attribution.analysis import ExportData


def render(outfile: TextIO, data: ExportData) -> None:
    for row in data.spans:
        outfile.write(json.dumps(row, separators=(",", ":")) + "\n")
