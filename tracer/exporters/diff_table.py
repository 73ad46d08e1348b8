"""``tracer diff``'s terminal table, in the attribution table's style."""

from __future__ import annotations

import shlex
from typing import Any, TextIO

from ollama_tracer.attribution.diff import INTERVAL_ROW, UNATTRIBUTED_ROW
from ollama_tracer.units import format_ms
from rich.console import Console
from rich.markup import escape
from rich.table import Table


def _command_line(command: list[str]) -> str:
    """The captured command as one shell line, the interpreter's path shortened to its name."""
    if not command:
        return "?"
    return shlex.join([command[0].rsplit("/", 1)[-1], *command[1:]])


def _side_line(label: str, side: dict[str, Any]) -> str:
    return (f"{label} = {side['directory']}: {_command_line(side['command'])} "
            f"({', '.join(side['models']) or 'model ?'}, Ollama {side['ollama_version'] or '?'}, "
            f"{side['intervals']} interval(s))")


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
        interval = f"[{format_ms(low, signed=True)}, {format_ms(high, signed=True)}]"
        table.add_row(escape(name), f"{row['n_a']}/{row['n_b']}", format_ms(row["median_a_ms"]),
                      format_ms(row["median_b_ms"]), format_ms(row["change_ms"], signed=True), percent, interval,
                      row["verdict"], style=style)
    console.print(table)
