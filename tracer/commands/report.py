"""Recompute and print the attribution of a capture directory, from its raw records alone.

`tracer report DIR [--format table|json]`
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from tracer.commands.capture import add_show_argument
from tracer.errors import ExitCode
from tracer.exporters import table as table_exporter
from tracer.pipeline import compute


class ReportCommand:
    """Recompute and print a capture's attribution (table or JSON)."""

    name = "report"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("directory", type=Path, help="a capture directory")
        parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")
        add_show_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        data = compute(args.directory)
        if args.format == "json":
            json.dump(data.attribution, sys.stdout, indent=2)
            print()
        else:
            table_exporter.render(sys.stdout, data, show=args.show)
        return int(ExitCode.OK)
