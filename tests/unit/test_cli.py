from __future__ import annotations

import pytest
from ollama_tracer import __version__
from ollama_tracer.cli import build_parser, main
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
