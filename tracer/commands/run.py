"""Run a Python program with its Ollama calls traced, spans straight to an OTLP endpoint.

`tracer run [--otlp-endpoint URL] -- python app.py`

The familiar `opentelemetry-instrument` workflow, for Ollama apps: no capture directory, no
attribution, no change to the program. The `ollama` client and `requests` calls to Ollama
become GenAI spans (client.request and client.first_token inside), exported to
--otlp-endpoint or $OTEL_EXPORTER_OTLP_ENDPOINT (e.g. Jaeger at http://127.0.0.1:4317).
Use `tracer capture` for the server-side phases and the attribution table.
"""

from __future__ import annotations

import argparse
import os

from ollama_tracer.autoinstrument import child_env
from ollama_tracer.capture.session import resolve_command
from ollama_tracer.commands.arguments import add_otlp_arguments
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.exporters.otlp import protocol_for


class RunCommand:
    """Run a Python program with its Ollama calls traced, spans straight to an OTLP endpoint."""

    name = "run"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        add_otlp_arguments(parser)
        parser.add_argument("--service-name", default=None,
                            help="service.name of the spans (default: $OTEL_SERVICE_NAME or ollama-client)")
        parser.add_argument("--record-content", action="store_true",
                            help="record prompt and completion text (off by default)")
        parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    def run(self, args: argparse.Namespace) -> int:
        command = resolve_command(args.cmd)
        endpoint = (args.otlp_endpoint or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
                    or os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT"))
        if not endpoint:
            raise TracerError("no OTLP endpoint: pass --otlp-endpoint URL or set OTEL_EXPORTER_OTLP_ENDPOINT "
                              "(Jaeger: http://127.0.0.1:4317).", ExitCode.USAGE)
        protocol = protocol_for(endpoint, args.otlp_protocol or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL"))
        base = dict(os.environ)
        if args.service_name:
            base["OTEL_SERVICE_NAME"] = args.service_name
        env = child_env(base, endpoint=endpoint, protocol=protocol, record_content=args.record_content)
        try:
            os.execvpe(command[0], command, env)  # the program becomes this process: signals, exit code
        except OSError as err:
            raise TracerError(f"could not start {command[0]!r}: {err.strerror}.", ExitCode.COMMAND_NOT_FOUND) from err
        return int(ExitCode.FAILURE)  # not reached
