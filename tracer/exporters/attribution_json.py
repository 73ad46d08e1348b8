"""``attribution.json`` (and ``tracer report --format json``): the attribution as one JSON document."""

from __future__ import annotations

import json
from typing import TextIO

from ollama_tracer.attribution.analysis import ExportData


def render(outfile: TextIO, data: ExportData) -> None:
    json.dump(data.attribution, outfile, indent=2, sort_keys=False)
    outfile.write("\n")
