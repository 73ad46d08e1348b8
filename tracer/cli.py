"""The ``tracer`` command line: ``main(argv) -> int`` is what the tests call."""

from __future__ import annotations

import argparse
import inspect
import sys
from collections.abc import Sequence

from ollama_tracer import __version__
from ollama_tracer.commands import Command
from ollama_tracer.errors import ExitCode, TracerError


def _commands() -> list[Command]:
    # Imported here so `tracer --version` stays fast and a broken optional import
    # in one subcommand cannot take the others down.
    from ollama_tracer.commands.attach import AttachCommand
    from ollama_tracer.commands.bench import BenchCommand
    from ollama_tracer.commands.capture import CaptureCommand
    from ollama_tracer.commands.diff import DiffCommand
    from ollama_tracer.commands.doctor import DoctorCommand
    from ollama_tracer.commands.export import ExportCommand
    from ollama_tracer.commands.proxy import ProxyCommand
    from ollama_tracer.commands.report import ReportCommand
    from ollama_tracer.commands.run import RunCommand
    from ollama_tracer.commands.testbed import TestbedCommand

    return [TestbedCommand(), BenchCommand(), CaptureCommand(), ReportCommand(), DiffCommand(), ExportCommand(),
            DoctorCommand(), ProxyCommand(), RunCommand(), AttachCommand()]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="tracer",
        description="Attribute the latency of Ollama requests to named phases, with evidence "
        "from the client, the server, the GPU and stacks on one timeline.",
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for command in _commands():
        doc = inspect.getdoc(command) or ""
        sub_parser = sub.add_parser(
            command.name,
            help=doc.splitlines()[0] if doc else None,
            description=doc,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        command.prepare_parser(sub_parser)
        sub_parser.set_defaults(_command=command)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
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
    sys.exit(main())
