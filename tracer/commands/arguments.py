"""The arguments several subcommands share, and what they do: OTLP export, extra table columns,
numbers that must be positive."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files
from ollama_tracer.errors import TracerError
from ollama_tracer.exporters.otlp import PROTOCOLS, export_rows
from ollama_tracer.exporters.table import SHOW_CHOICES


def positive(kind: type[float] | type[int]) -> Any:
    def parse(text: str) -> float | int:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be greater than 0, got {text}")
        return value

    return parse


def non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return value


def add_otlp_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--otlp-endpoint", required=required,
                        help="export to this OTLP endpoint, e.g. http://127.0.0.1:4317 (Jaeger)")
    parser.add_argument("--otlp-protocol", choices=PROTOCOLS,
                        help="grpc or http/protobuf (default: from the URL; port 4318 means http)")


def export_capture(directory: Path, endpoint: str, protocol: str | None) -> dict[str, object]:
    """Export a capture's spans.jsonl and note the result in export.json (failures too)."""
    rows, _ = capture_files.read_jsonl(directory / capture_files.SPANS_JSONL)
    try:
        result = export_rows(rows, endpoint, protocol)
    except TracerError as err:
        capture_files.write_json(directory / capture_files.EXPORT_JSON, {"endpoint": endpoint, "status": "failed",
                                                           "error": err.message})
        raise
    capture_files.write_json(directory / capture_files.EXPORT_JSON, {**result, "status": "exported"})
    return result


def export_if_asked(directory: Path, args: argparse.Namespace) -> None:
    """With --otlp-endpoint, export the capture; a refusal is a warning (the capture is on disk,
    and `tracer export` sends it later), not a failure of the command."""
    if not args.otlp_endpoint:
        return
    try:
        exported = export_capture(directory, args.otlp_endpoint, args.otlp_protocol)
        print(f"Exported {exported['exported_spans']} spans to {args.otlp_endpoint}.", flush=True)
    except TracerError as err:
        print(f"tracer: warning: {err.message}", file=sys.stderr)


def rate(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of samples per second") from None
    if not 0 <= value <= 10_000:
        raise argparse.ArgumentTypeError(f"{value} is outside 0..10000 samples per second")
    return value


def add_show_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--show", type=show, default=(), metavar="gpu,stacks",
                        help="extra table columns: gpu (utilization per phase), stacks (top function per process)")


def show(text: str) -> tuple[str, ...]:
    chosen = tuple(word.strip() for word in text.split(",") if word.strip())
    unknown = [word for word in chosen if word not in SHOW_CHOICES]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown column {unknown[0]!r}; choose from {', '.join(SHOW_CHOICES)}")
    return chosen


def add_log_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the server's log (OLLAMA_DEBUG=1) is: a file, or a systemd unit's journal."""
    where = parser.add_mutually_exclusive_group()
    where.add_argument("--ollama-log", type=Path, metavar="FILE",
                       help="the server's log file: its stderr, or a container's json-file log (`docker "
                            "inspect -f '{{.LogPath}}' ollama`); default: the testbed's, when it is the target")
    where.add_argument("--ollama-unit", metavar="UNIT",
                       help="read the log from the journal of this systemd unit (`journalctl -u UNIT`); default: "
                            "the server's own unit, when its cgroup names one (the official install's ollama.service)")


def log_source(args: argparse.Namespace, host: str | None, pid: int | None) -> tuple[Path | None, str | None]:
    """(log file, systemd unit): what the user said, else the testbed's for its own server, else
    what the server's cgroup names (a container's Docker log, or the unit's journal), else the file
    its stderr goes to; (None, None) when there is none to find."""
    if args.ollama_log or args.ollama_unit:
        return args.ollama_log, args.ollama_unit
    from ollama_tracer.deployment import detect
    from ollama_tracer.testbed.runtime import TestbedState, testbed_dir

    state = TestbedState.load(testbed_dir() / "state.json")
    for server in state.servers:  # one per Ollama version and layout the testbed runs
        if host is not None and server.host == host and server.alive():
            return (Path(server.log_file) if server.log_file else None), server.log_source.get("unit")
    if pid is None:
        return None, None
    found = detect(pid)
    log = found.docker_log() or found.stderr_file()
    return log, (None if log else found.unit)
