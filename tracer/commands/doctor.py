"""Report what works on this machine, one line per capability, each with the exact fix.

Checks: Ollama reachable at OLLAMA_HOST (and its version); root or CAP_BPF; bpftrace;
tracefs; py-spy; NVML (GPU sampling); Jaeger / an OTLP endpoint when one is given.
Exit status: 0 when nothing failed (optional parts may be unavailable), 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from ollama_tracer.doctor_checks import CheckResult, run_checks
from ollama_tracer.errors import ExitCode
from ollama_tracer.ollama_host import resolve_host

_MARK = {"ok": "OK  ", "unavailable": "N/A ", "fail": "FAIL", "skipped": "--  "}


class DoctorCommand:
    """Report which capabilities work here (Ollama, eBPF, py-spy, NVML, Jaeger) and how to fix the rest."""

    name = "doctor"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--host", help="Ollama base URL (default: $OLLAMA_HOST or 127.0.0.1:11434)")
        parser.add_argument(
            "--otlp-endpoint", help="an OTLP endpoint to check, e.g. http://127.0.0.1:4317 (Jaeger)"
        )
        parser.add_argument("--jaeger-query", help="Jaeger's query API to check, e.g. http://127.0.0.1:16686")
        parser.add_argument("--json", action="store_true", help="print the checks as JSON")

    def run(self, args: argparse.Namespace) -> int:
        results = run_checks(
            ollama_host=resolve_host(args.host),
            otlp_endpoint=args.otlp_endpoint,
            jaeger_query=args.jaeger_query,
        )
        if args.json:
            json.dump({"schema": "tracer.doctor/1", "checks": [r.to_json() for r in results]}, sys.stdout,
                      indent=2)
            print()
        else:
            _print_table(results)
        failed = any(r.status == "fail" for r in results)
        return int(ExitCode.FAILURE if failed else ExitCode.OK)


def _print_table(results: list[CheckResult]) -> None:
    width = max(len(r.name) for r in results)
    for r in results:
        line = f"[{_MARK[r.status]}] {r.name:<{width}}  {r.detail}"
        if r.fix and r.status != "ok":
            line += f"\n       {'':<{width}}  fix: {r.fix}"
        print(line)
