"""Compare two captures phase by phase: `tracer diff DIR_A DIR_B [--format table|json]`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ollama_tracer.attribution.analysis import compute
from ollama_tracer.attribution.diff import DEFAULT_RESAMPLES, DEFAULT_SEED, compare, describe
from ollama_tracer.commands.arguments import positive
from ollama_tracer.errors import ExitCode
from ollama_tracer.exporters import diff_table, json_document

FORMATS = {"table": diff_table.render, "json": json_document.render}


class DiffCommand:
    """Compare two captures phase by phase (e.g. before/after an Ollama upgrade or a config change).

    Both captures are recomputed from their raw records. For each phase, `unattributed` and the
    whole interval it prints the median of A and of B over the measured (non-warm-up) intervals,
    the change B − A in ms and in %, and a 95 % bootstrap confidence interval of that change
    (each capture's intervals resampled with replacement; a fixed seed, so the same captures
    always give the same output). A change is significant when its interval excludes 0. A phase
    found in only one capture (e.g. server.model_load in B) is a change too: significant when
    that capture has at least 2 intervals and the interval of its median excludes 0.
    """

    name = "diff"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("directory_a", type=Path, metavar="DIR_A", help="the capture to compare from (before)")
        parser.add_argument("directory_b", type=Path, metavar="DIR_B", help="the capture to compare to (after)")
        parser.add_argument("--format", choices=("table", "json"), default="table", help="output format")
        parser.add_argument("--resamples", type=positive(int), default=DEFAULT_RESAMPLES,
                            help=f"bootstrap resamples (default: {DEFAULT_RESAMPLES})")
        parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                            help=f"bootstrap seed (default: {DEFAULT_SEED})")

    def run(self, args: argparse.Namespace) -> int:
        sides = []
        for directory in (args.directory_a, args.directory_b):
            data = compute(directory)
            sides.append(describe(str(directory), data.meta, data.attribution, data.ollama_version))
        document = compare(sides[0], sides[1], resamples=args.resamples, seed=args.seed)
        FORMATS[args.format](sys.stdout, document)
        return int(ExitCode.OK)
