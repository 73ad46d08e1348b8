"""The attribution table for the terminal (rich)."""

from __future__ import annotations

from typing import Any, TextIO

from ollama_tracer.attribution.analysis import ExportData
from ollama_tracer.units import accuracy_statement
from ollama_tracer.units import format_ms as _ms
from ollama_tracer.vocabulary import DESIGN_IN_PROCESS
from rich.console import Console
from rich.table import Table

SHOW_CHOICES = ("gpu", "stacks")


def _gpu_cell(phase: dict[str, Any]) -> str:
    gpus = phase.get("gpu") or {}
    return " ".join(f"{'' if len(gpus) == 1 else f'GPU{i} '}{g['util_mean']:.0f}/{g['util_max']:.0f} %"
                    for i, g in sorted(gpus.items())) or "—"


def _stacks_cell(phase: dict[str, Any]) -> str:
    lines = []
    for role, functions in (phase.get("top_functions") or {}).items():
        if functions:
            top = functions[0]
            lines.append(f"{role}: {_short(top['function'])} ({top['samples']:g})")
    return "\n".join(lines) or "—"


def _short(function: str) -> str:
    """``github.com/ollama/ollama/fs/gguf.readString`` → ``gguf.readString``;
    ``SyncStream.read (/usr/lib/python3/httpcore/_backends/sync.py)`` → ``SyncStream.read (sync.py)``."""
    name, paren, where = function.partition(" (")
    if paren:
        return f"{name} ({where.rstrip(')').rsplit('/', 1)[-1]})"
    return function.rsplit("/", 1)[-1]


def render(outfile: TextIO, data: ExportData, show: tuple[str, ...] = ()) -> None:
    summary: dict[str, Any] = data.attribution.get("summary", {})
    console = Console(file=outfile, width=140 + 40 * len(show), force_terminal=False)
    if not summary.get("intervals"):
        console.print("No intervals found: the command made no Ollama request that reached a first token.")
        render_server_requests(console, data.attribution)
        render_diagnosis(console, data.attribution.get("diagnosis") or [])  # a stalled first request, say
        return
    interval = summary["interval"]
    kinds = {iv["kind"] for iv in data.attribution["intervals"] if not iv["warmup"]}
    title = ("interrupt → first token" if kinds == {"interrupt"} else "request → first token")
    table = Table(title=f"Where the {title} time goes",
                  caption=f"{summary['intervals']} interval(s), median {interval['median_ms']:.2f} ms, "
                          f"coverage {100 * summary['coverage']:.1f} %")
    for column, justify in (("phase", "left"), ("process", "left"), ("source", "left"), ("median ms", "right"),
                            ("p95 ms", "right"), ("share", "right")):
        table.add_column(column, justify=justify)  # type: ignore[arg-type]
    if "gpu" in show:
        table.add_column("GPU util mean/max", justify="right")
    if "stacks" in show:
        table.add_column("top function per process (samples)", justify="left")
    blanks = [""] * len(show)
    for phase in summary["phases"]:
        extra = [_gpu_cell(phase) if column == "gpu" else _stacks_cell(phase) for column in show]
        table.add_row(phase["name"], phase["process"], phase["source"], _ms(phase["median_ms"]),
                      _ms(phase["p95_ms"]), f"{100 * phase['share']:.1f} %", *extra)
    un = summary["unattributed"]
    table.add_row("unattributed", "", "", _ms(un["median_ms"]), _ms(un["p95_ms"]), f"{100 * un['share']:.1f} %",
                  *blanks, style="dim")
    table.add_row("interval", "", "", _ms(interval["median_ms"]), _ms(interval["p95_ms"]), "100.0 %", *blanks,
                  style="bold")
    console.print(table)
    ebpf = ((data.meta.get("collectors") or {}).get("ebpf") or {}).get("stats") or {}
    if ebpf.get("design") == DESIGN_IN_PROCESS:
        console.print("(one process: llama.cpp runs inside the client (llama-cpp-python), so its runner.* phases "
                      "are library calls in the client process, not a separate runner)", highlight=False)
    statement = accuracy_statement()
    if statement:
        console.print(f"({statement})", highlight=False)
    excluded = summary.get("warmup_intervals_excluded")
    if excluded:
        console.print(f"({excluded} warm-up interval(s) excluded from the summary)")
    matching = data.attribution.get("ebpf_matching") or {}
    unmatched, missing = matching.get("unmatched") or [], matching.get("missing") or []
    if unmatched or missing:
        boundaries = sorted({m["boundary"] for m in missing})
        console.print(f"(eBPF: {len(unmatched)} interval(s) not matched to their server events, "
                      f"{len({m['interval'] for m in missing})} with a boundary missing"
                      + (f" ({', '.join(boundaries)})" if boundaries else "")
                      + ": attribution.json's ebpf_matching says why)", highlight=False)
    render_server_requests(console, data.attribution)
    if "gpu" in show and not data.attribution.get("correlation", {}).get("gpu_samples"):
        console.print("(no GPU samples in this capture: see `tracer doctor` for why)")
    render_diagnosis(console, data.attribution.get("diagnosis") or [])


def render_server_requests(console: Console, attribution: dict[str, Any]) -> None:
    """Requests the server saw that only it recorded, and those no interval could follow, with why."""
    seen = attribution.get("server_requests") or {}
    if seen.get("server_only") and attribution.get("intervals"):
        only = sum(1 for iv in attribution["intervals"] if iv.get("seen_from") == "server")
        console.print(f"(server side: {seen['server_only']} of {seen['seen']} request(s) had no client span "
                      f"(an uninstrumented client); {only} interval(s) have server and runner phases only, "
                      "no client phases)", highlight=False)
    rows = attribution.get("untracked_requests") or []
    others = [f"{r['endpoint']} ×{r['count']}" for r in rows if r["endpoint"] != "generation"]
    if others:
        console.print(f"(the server also read requests it does not generate for, not followed: {', '.join(others)})",
                      highlight=False)
    for row in rows:
        if row["endpoint"] == "generation":
            console.print(f"({row['count']} generation request(s) not followed: {row['reason']})", highlight=False)


def render_diagnosis(console: Console, findings: list[dict[str, Any]]) -> None:
    """Each known cause the capture shows: what, the evidence, and what to do about it."""
    if not findings:
        console.print("Diagnosis: no known cause stands out in this capture.")
        return
    console.print(f"Diagnosis: {len(findings)} known cause(s), largest first")
    for number, finding in enumerate(findings, 1):
        console.print(f"{number}. {finding['title']} ({finding['cause']}): {finding['summary']}", highlight=False)
        for line in finding["evidence"]:
            console.print(f"   evidence: {line}", highlight=False)
        console.print(f"   remedy:   {finding['remedy']}", highlight=False)
