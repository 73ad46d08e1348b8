"""Compare two captures phase by phase: `tracer diff DIR_A DIR_B [--format table|json]`."""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Any, TextIO

from ollama_tracer.attribution.analysis import compute
from ollama_tracer.attribution.diff import (
    DEFAULT_RESAMPLES,
    DEFAULT_SEED,
    INTERVAL_ROW,
    UNATTRIBUTED_ROW,
    compare,
    describe,
)
from ollama_tracer.commands.bench import _positive
from ollama_tracer.errors import ExitCode
from rich.console import Console
from rich.markup import escape
from rich.table import Table


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
        parser.add_argument("--resamples", type=_positive(int), default=DEFAULT_RESAMPLES,
                            help=f"bootstrap resamples (default: {DEFAULT_RESAMPLES})")
        parser.add_argument("--seed", type=int, default=DEFAULT_SEED,
                            help=f"bootstrap seed (default: {DEFAULT_SEED})")

    def run(self, args: argparse.Namespace) -> int:
        sides = []
        for directory in (args.directory_a, args.directory_b):
            data = compute(directory)
            sides.append(describe(str(directory), data.meta, data.attribution, _ollama_version(directory, data.meta)))
        document = compare(sides[0], sides[1], resamples=args.resamples, seed=args.seed)
        if args.format == "json":
            json.dump(document, sys.stdout, indent=2)
            print()
        else:
            render(sys.stdout, document)
        return int(ExitCode.OK)


def _ollama_version(directory: Path, meta: dict[str, Any]) -> str | None:
    """capture.json's server version; a capture that did not record it may still have the eBPF
    collector's, which read it from the server to choose its probes."""
    version = (meta.get("ollama") or {}).get("version")
    if version:
        return str(version)
    try:
        ebpf_meta = json.loads((directory / "raw" / "ebpf_meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    found = (ebpf_meta.get("plan") or {}).get("version") if isinstance(ebpf_meta, dict) else None
    return str(found) if found else None


def _command_line(command: list[str]) -> str:
    """The captured command as one shell line, the interpreter's path shortened to its name."""
    if not command:
        return "?"
    return shlex.join([command[0].rsplit("/", 1)[-1], *command[1:]])


def _side_line(label: str, side: dict[str, Any]) -> str:
    return (f"{label} = {side['directory']}: {_command_line(side['command'])} "
            f"({', '.join(side['models']) or 'model ?'}, Ollama {side['ollama_version'] or '?'}, "
            f"{side['intervals']} interval(s))")


def _ms(value: float | None, signed: bool = False) -> str:
    if value is None:
        return "—"
    return f"{value:+.2f}" if signed else f"{value:.2f}"


def render(outfile: TextIO, document: dict[str, Any]) -> None:
    """The diff as a terminal table, in the attribution table's style."""
    console = Console(file=outfile, width=160, force_terminal=False)
    # markup=False: commands and paths are the user's text, and rich would eat their [brackets].
    console.print(f"diff {_side_line('A', document['a'])} → {_side_line('B', document['b'])}",
                  markup=False, highlight=False)
    for note in document["notes"]:
        console.print(f"note: {note}", markup=False, highlight=False)
    bootstrap = document["bootstrap"]
    table = Table(title="Per-phase change, B − A (medians over measured intervals)",
                  caption=f"95 % CI: percentile bootstrap of median(B) − median(A), {bootstrap['resamples']} "
                          f"resamples, seed {bootstrap['seed']}; warm-up intervals excluded")
    for column, justify in (("phase", "left"), ("n A/B", "right"), ("median A ms", "right"),
                            ("median B ms", "right"), ("change ms", "right"), ("change", "right"),
                            ("95 % CI ms", "right"), ("verdict", "left")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    for row in document["rows"]:
        low, high = row["ci95_ms"]
        percent = "—" if row["change_percent"] is None else f"{row['change_percent']:+.1f} %"
        name = row["name"] + (" (off path)" if row["off_critical_path"] else "")
        style = None if row["off_critical_path"] else {UNATTRIBUTED_ROW: "dim", INTERVAL_ROW: "bold"}.get(row["name"])
        table.add_row(escape(name), f"{row['n_a']}/{row['n_b']}", _ms(row["median_a_ms"]), _ms(row["median_b_ms"]),
                      _ms(row["change_ms"], signed=True), percent, f"[{_ms(low, True)}, {_ms(high, True)}]",
                      row["verdict"], style=style)
    console.print(table)
