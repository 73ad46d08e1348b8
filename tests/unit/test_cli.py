from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
from ollama_tracer import __version__
from ollama_tracer.cli import COMMANDS, build_parser, load_command, main
from ollama_tracer.errors import ExitCode


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"tracer {__version__}"


def test_help_lists_only_working_subcommands(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    parser = build_parser()
    listed = set(parser._subparsers._group_actions[0].choices)  # type: ignore[union-attr]
    assert listed
    for name in listed:
        assert name in out


def test_no_subcommand_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([]) == ExitCode.USAGE


def test_each_listed_summary_is_its_commands_own_first_line() -> None:
    """`tracer --help` lists the subcommands without importing them: its summaries must say what
    each class's docstring says."""
    for name, (_module, _cls, summary) in COMMANDS.items():
        command = load_command(name)
        assert command.name == name
        assert (inspect.getdoc(command) or "").splitlines()[0] == summary, name


def test_help_and_version_import_no_subcommand() -> None:
    """The CLI starts without numpy, gRPC or any subcommand's module (issue 18: ≤ 0.2 s)."""
    code = ("import sys; from ollama_tracer.cli import main\n"
            "try:\n    main(['--help'])\nexcept SystemExit:\n    pass\n"
            "loaded = [m for m in sys.modules if m.startswith('ollama_tracer.commands.') or m.split('.')[0] in "
            "('numpy', 'grpc', 'requests', 'opentelemetry', 'gguf')]\n"
            "print('loaded:' + ','.join(sorted(loaded)))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip().splitlines()[-1] == "loaded:", proc.stdout


def test_a_subcommands_help_builds_only_that_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["report", "--help"])
    assert "--format" in capsys.readouterr().out



@pytest.mark.parametrize("size", [10, 100_000])  # still buffered at the end; written while it runs
def test_a_reader_that_went_away_ends_it_quietly(size: int) -> None:
    """`tracer testbed status --json | head`: the pipe's reader closed before the output was
    written. No traceback, and the shell's code for it (128 + SIGPIPE). The entry point runs a
    command that prints, as every subcommand does, into a real pipe already closed."""
    code = (f"import ollama_tracer.cli as cli; cli.main = lambda argv=None: print('x' * {size}) or 0; "
            "cli.entry()")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stderr is not None
    proc.stdout.close()  # before it starts (Python alone takes tens of ms): its writes fail
    stderr = proc.stderr.read()
    assert proc.wait(timeout=60) == ExitCode.PIPE_CLOSED, stderr
    assert "Traceback" not in stderr and "BrokenPipeError" not in stderr, stderr
