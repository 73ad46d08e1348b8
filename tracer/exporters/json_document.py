"""Any JSON document of ours (a diff, a benchmark's result) as indented JSON."""

from __future__ import annotations

from typing import Any, TextIO

from ollama_tracer.capture_files import json_text


def render(outfile: TextIO, document: dict[str, Any]) -> None:
    outfile.write(json_text(document))
    outfile.write("\n")
