"""Send a capture to an OTLP endpoint (Jaeger) after the fact, e.g. once Jaeger is up.

`tracer export DIR --otlp-endpoint URL [--otlp-protocol grpc|http/protobuf]`
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ollama_tracer import capture_files
from ollama_tracer.attribution.analysis import compute
from ollama_tracer.capture import directory as capture_directory
from ollama_tracer.commands.arguments import add_otlp_arguments, export_capture
from ollama_tracer.errors import ExitCode
from ollama_tracer.exporters import write_outputs


class ExportCommand:
    """Export a capture directory's traces to an OTLP endpoint (Jaeger)."""

    name = "export"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("directory", type=Path, help="a capture directory")
        add_otlp_arguments(parser, required=True)

    def run(self, args: argparse.Namespace) -> int:
        capture_directory.load_capture_meta(args.directory)
        if not (args.directory / capture_files.SPANS_JSONL).exists():  # an interrupted capture: rebuild it
            write_outputs(args.directory, compute(args.directory))
        result = export_capture(args.directory, args.otlp_endpoint, args.otlp_protocol)
        print(f"Exported {result['exported_spans']} spans ({', '.join(result['services'])}) "  # type: ignore[arg-type]
              f"to {args.otlp_endpoint}.")
        return int(ExitCode.OK)
