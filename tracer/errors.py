"""One error type that carries an exit code; it is caught only in ``tracer.cli.main``.

Every failure a user can fix is one sentence plus the fix, with a distinct exit code,
so scripts can tell "Ollama is down" from "bad capture directory" without parsing text.
"""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1  # a generic failure, or a child command that failed
    USAGE = 2  # bad command-line arguments (argparse uses 2 as well)
    OLLAMA_UNREACHABLE = 3
    MODEL_NOT_FOUND = 4
    PERMISSION = 5  # missing root / CAP_BPF / ptrace
    MISSING_DEPENDENCY = 6  # a tool or package is not installed
    BAD_CAPTURE = 7  # a capture directory is missing, empty or corrupt
    EXPORT_FAILED = 8  # the OTLP endpoint (Jaeger) is unreachable or refused the data
    BUILD_FAILED = 9  # a testbed build step failed
    OUTPUT_EXISTS = 10  # refusing to overwrite without --force
    SERVER_STALLED = 11  # Ollama accepted a request and then sent nothing (e.g. the v0.13 interrupt deadlock)
    ADDRESS_IN_USE = 12  # the proxy's --listen address is taken
    DISK_FULL = 13  # the capture directory's disk filled up (what was written before is kept)
    VERSION_NOT_SERVED = 14  # `testbed up --ollama V`: the Go module proxy does not serve Ollama V
    COMMAND_NOT_FOUND = 127  # the command given to `tracer capture` does not exist
    INTERRUPTED = 130  # Ctrl-C (128 + SIGINT)
    PIPE_CLOSED = 141  # what read our output went away, e.g. `tracer ... | head` (128 + SIGPIPE)


class TracerError(Exception):
    """A failure the user can act on: ``message`` is one sentence that includes the fix."""

    def __init__(self, message: str, exit_code: ExitCode = ExitCode.FAILURE) -> None:
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
