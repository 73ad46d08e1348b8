"""Recompute and print the attribution of a capture directory, from its raw records alone.

`tracer report DIR [--format table|json|html] [-o FILE]`
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ollama_tracer import capture_files
from ollama_tracer.attribution.analysis import compute
from ollama_tracer.commands.arguments import add_show_argument
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.exporters import attribution_json, write_rendered
from ollama_tracer.exporters import html as html_exporter
from ollama_tracer.exporters import table as table_exporter


class ReportCommand:
    """Recompute and print a capture's attribution (table or JSON), or write it as a self-contained HTML report."""

    name = "report"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("directory", type=Path, help="a capture directory")
        parser.add_argument("--format", choices=("table", "json", "html"), default="table", help="output format")
        parser.add_argument("-o", "--output", type=Path, metavar="FILE",
                            help="where --format html writes (default: DIR/report.html)")
        add_show_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        if args.output is not None and args.format != "html":
            raise TracerError("-o/--output is where --format html writes; add --format html, or drop -o.",
                              ExitCode.USAGE)
        data = compute(args.directory)
        if args.format == "html":
            output = args.output or args.directory / capture_files.REPORT_HTML
            write_rendered(output, html_exporter.render, data)
            print(f"Wrote {output}. Open it in a browser (it needs no network).")
        elif args.format == "json":
            attribution_json.render(sys.stdout, data)
        else:
            table_exporter.render(sys.stdout, data, show=args.show)
        return int(ExitCode.OK)
