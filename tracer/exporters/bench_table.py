"""``tracer bench interrupt``'s table: per iteration, then the interval's summary (the seed's layout)."""

from __future__ import annotations

import functools
from typing import Any, TextIO

from ollama_tracer.units import format_ms
from rich.console import Console
from rich.table import Table

_ms = functools.partial(format_ms, unit=True)


def render(outfile: TextIO, result: dict[str, Any]) -> None:
    """The per-iteration table, the interval's summary, and the phases rebuilt from the response."""
    console = Console(file=outfile, width=140)
    backend = result.get("backend", "ollama")
    engine = (f"Ollama {result['ollama_version']}" if backend == "ollama"
              else f"{backend} {result.get('engine_version') or '(version unknown)'}")
    table = Table(title=f"interrupt benchmark: {result['model']} via {result['client']} ({engine})")
    for column in ("#", "first stage", "second stage", "interrupt → 2nd first token",
                   "total", "load", "prompt_eval", "eval"):
        table.add_column(column, justify="right")
    for it in result["iterations"]:
        t = it["second_stage_timings"]
        table.add_row(
            f"{it['index']}{' (warm-up)' if it['warmup'] else ''}", _ms(it["first_stage_ms"]),
            _ms(it["second_stage_ms"]), _ms(it["interrupt_to_first_token_ms"]), _ms(t["total_ms"]),
            _ms(t["load_ms"]), _ms(t["prompt_eval_ms"]), _ms(t["eval_ms"]),
        )
    console.print(table)
    s = result["summary"]["interrupt_to_first_token_ms"]
    console.print(
        f"interrupt → first token: mean {_ms(s['mean'])}, median {_ms(s['median'])}, min {_ms(s['min'])}, "
        f"max {_ms(s['max'])}, stdev {_ms(s['stdev'])} (n={s['n']}, sample stdev)"
    )
    phases = [(k.removeprefix("phase:"), v) for k, v in result["summary"].items() if k.startswith("phase:")]
    if phases:
        split = Table(title="second stage, rebuilt from the response (source=response, median)")
        split.add_column("phase")
        split.add_column("median", justify="right")
        split.add_column("share of interval", justify="right")
        interval = s["median"] or 0.0
        for name, stats in phases:
            share = f"{100 * stats['median'] / interval:.1f} %" if interval and stats["median"] is not None else "—"
            split.add_row(name, _ms(stats["median"]), share)
        console.print(split)
