"""The ``tracer`` command line: ``main(argv) -> int`` is what the tests call."""

from __future__ import annotations

import argparse
import importlib
import inspect
import os
import sys
from collections.abc import Sequence

from ollama_tracer import __version__
from ollama_tracer.commands import Command
from ollama_tracer.errors import ExitCode, TracerError

# name -> (module under ollama_tracer.commands, class, the first line of its docstring). Only the
# subcommand that runs is imported: `tracer --help` and `tracer --version` load none of them (numpy,
# gRPC and the collectors stay unloaded), and a broken optional import in one subcommand cannot take
# the others down. tests/unit/test_cli.py checks each summary against its class's docstring.
COMMANDS: dict[str, tuple[str, str, str]] = {
    "testbed": ("testbed", "TestbedCommand", "Start or stop a local, real Ollama testbed (and optionally Jaeger)."),
    "bench": ("bench", "BenchCommand", "Run a built-in benchmark against Ollama (`tracer bench interrupt`)."),
    "capture": ("capture", "CaptureCommand",
                "Run a command under observation; write a capture directory and the attribution table."),
    "report": ("report", "ReportCommand",
               "Recompute and print a capture's attribution (table or JSON), or write it as a self-contained "
               "HTML report."),
    "diff": ("diff", "DiffCommand",
             "Compare two captures phase by phase (e.g. before/after an Ollama upgrade or a config change)."),
    "export": ("export", "ExportCommand", "Export a capture directory's traces to an OTLP endpoint (Jaeger)."),
    "doctor": ("doctor", "DoctorCommand",
               "Report which capabilities work here (Ollama, eBPF, py-spy, NVML, Jaeger) and how to fix the rest."),
    "proxy": ("proxy", "ProxyCommand",
              "Trace any client, in any language, through a streaming reverse proxy in front of Ollama."),
    "run": ("run", "RunCommand",
            "Run a Python program with its Ollama calls traced, spans straight to an OTLP endpoint."),
    "attach": ("attach", "AttachCommand",
               "Observe an Ollama that is already running: eBPF, log and GPU, for a window of time."),
}


def load_command(name: str) -> Command:
    """The subcommand ``name``'s object, its module imported now."""
    module, cls, _summary = COMMANDS[name]
    return getattr(importlib.import_module(f"ollama_tracer.commands.{module}"), cls)()  # type: ignore[no-any-return]


def _chosen(argv: Sequence[str]) -> str | None:
    """The subcommand named on the command line (the first word that is not an option), if any."""
    word = next((a for a in argv if not a.startswith("-")), None)
    return word if word in COMMANDS else None


def build_parser(argv: Sequence[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: every subcommand is listed, and the one it names is fully built
    (with ``argv`` None, all of them are)."""
    parser = argparse.ArgumentParser(
        prog="tracer",
        description="Attribute the latency of Ollama requests to named phases, with evidence "
        "from the client, the server, the GPU and stacks on one timeline.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    chosen = _chosen(argv) if argv is not None else None
    for name, (_module, _cls, summary) in COMMANDS.items():
        if argv is not None and name != chosen:
            sub.add_parser(name, help=summary)
            continue
        command = load_command(name)
        doc = inspect.getdoc(command) or ""
        sub_parser = sub.add_parser(
            name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.prepare_parser(sub_parser)
        sub_parser.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    command: Command | None = getattr(args, "_command", None)
    if command is None:
        parser.print_help()
        return int(ExitCode.USAGE)
    try:
        return command.run(args)
    except TracerError as err:
        print(f"tracer: error: {err.message}", file=sys.stderr)
        return int(err.exit_code)
    except KeyboardInterrupt:
        print("tracer: interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)


def entry() -> None:
    try:
        code = main()
        sys.stdout.flush()  # inside the try: a closed pipe shows here for output still buffered
    except BrokenPipeError:
        # The reader went away (`tracer testbed status --json | head`): nothing of ours failed,
        # so no traceback. stdout now points at /dev/null, so that Python's own flush at exit
        # does not raise again; the code is the shell's for a process a pipe ended.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        code = int(ExitCode.PIPE_CLOSED)
    sys.exit(code)
