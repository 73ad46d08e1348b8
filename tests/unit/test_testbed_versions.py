"""`tracer testbed up --ollama VERSION`: argument parsing, state (de)serialisation, build bookkeeping."""

from __future__ import annotations

import argparse
import json
import os
import stat
import sys
from pathlib import Path

import pytest
from ollama_tracer.commands.testbed import TestbedCommand, describe, parse_versions, requested_versions
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed import llama_server_build, ollama_build
from ollama_tracer.testbed.runtime import ManagedProcess, OllamaServer, TestbedState, server_files
from ollama_tracer.testbed.steps import ninja_counter


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tracer testbed")
    TestbedCommand().prepare_parser(parser)
    return parser


# --------------------------------------------------------------------------- arguments


def test_default_is_one_server_of_the_default_version() -> None:
    args = _parser().parse_args(["up"])
    assert requested_versions(args.ollama) == ["0.13.5"]
    assert args.stripped is False


def test_ollama_is_repeatable_and_comma_separated() -> None:
    args = _parser().parse_args(["up", "--ollama", "0.13.5", "--ollama", "v0.34.4,0.13.5", "--stripped", "--json"])
    assert requested_versions(args.ollama) == ["0.13.5", "0.34.4"]
    assert args.stripped and args.json


@pytest.mark.parametrize("text", ["latest", "0.34", "0.34.4;rm", "", ","])
def test_bad_versions_are_usage_errors(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _parser().parse_args(["up", "--ollama", text])
    assert exc.value.code == ExitCode.USAGE
    assert "--ollama" in capsys.readouterr().err


def test_parse_versions_accepts_prereleases() -> None:
    assert parse_versions("0.35.0-rc1, v0.34.4") == ["0.35.0-rc1", "0.34.4"]


def test_env_status_and_down_take_a_version() -> None:
    parser = _parser()
    assert parser.parse_args(["env", "--ollama", "v0.34.4"]).ollama == "0.34.4"
    assert parser.parse_args(["env"]).ollama is None
    assert parser.parse_args(["status", "--json", "--ollama", "0.34.4"]).ollama == "0.34.4"
    assert requested_versions(parser.parse_args(["down", "--ollama", "0.34.4"]).ollama) == ["0.34.4"]
    assert parser.parse_args(["down"]).ollama is None


# --------------------------------------------------------------------------- state


def _server(version: str, port: int, pid: int = 4242, stripped: bool = False) -> OllamaServer:
    binary = f"/cache/ollama-{version}/bin/ollama"
    return OllamaServer(version=version, host=f"http://127.0.0.1:{port}", binary=binary,
                        process=ManagedProcess(pid=pid, argv=[binary, "serve"], log=f"/tb/ollama-{version}.log"),
                        stripped=stripped, models=["tracer-gemma3:test", "tracer-llama:test"])


def test_state_round_trips_with_every_server(tmp_path: Path) -> None:
    state = TestbedState()
    state.set_server(_server("0.34.4", 5001, stripped=True))
    state.set_server(_server("0.13.5", 5000))
    path = tmp_path / "state.json"
    state.save(path)
    raw = json.loads(path.read_text())
    assert raw["schema"] == "tracer.testbed/1"
    assert [s["version"] for s in raw["servers"]] == ["0.13.5", "0.34.4"]  # the default first
    # The top-level fields that older readers use describe the default version's server.
    assert raw["ollama_host"] == "http://127.0.0.1:5000"
    assert raw["ollama"]["argv"][0] == raw["ollama_binary"] == "/cache/ollama-0.13.5/bin/ollama"
    assert raw["models"] == ["tracer-gemma3:test", "tracer-llama:test"]
    loaded = TestbedState.load(path)
    assert loaded.servers == state.servers
    v034 = loaded.server("0.34.4")
    assert v034 is not None and v034.stripped
    assert loaded.ollama_host == "http://127.0.0.1:5000"


def test_without_the_default_the_first_server_is_primary(tmp_path: Path) -> None:
    state = TestbedState()
    state.set_server(_server("0.34.4", 5001))
    assert state.ollama_host == "http://127.0.0.1:5001"
    state.remove_server("0.34.4")
    assert state.ollama is None and state.ollama_host is None and state.models == []


def test_a_pre_servers_state_file_is_read_as_the_default_server(tmp_path: Path) -> None:
    path = tmp_path / "state.json"
    path.write_text(json.dumps({
        "schema": "tracer.testbed/1",
        "ollama": {"pid": 5362, "argv": ["/c/bin/ollama-0.13.5", "serve"], "log": "/tb/ollama.log"},
        "ollama_host": "http://127.0.0.1:43733",
        "ollama_binary": "/c/bin/ollama-0.13.5",
        "jaeger": None, "jaeger_endpoints": None,
        "models": ["tracer-gemma3:test"],
    }))
    state = TestbedState.load(path)
    assert len(state.servers) == 1
    server = state.servers[0]
    assert (server.version, server.host, server.port, server.log) == (
        "0.13.5", "http://127.0.0.1:43733", 43733, "/tb/ollama.log")
    assert state.ollama == server.process and state.models == ["tracer-gemma3:test"]


def test_torn_or_missing_state_is_empty(tmp_path: Path) -> None:
    assert TestbedState.load(tmp_path / "none.json").servers == []
    (tmp_path / "torn.json").write_text('{"servers": [')
    assert TestbedState.load(tmp_path / "torn.json").servers == []


def test_describe_lists_running_servers_and_picks_the_top_level(monkeypatch: pytest.MonkeyPatch) -> None:
    from ollama_tracer.testbed import runtime

    monkeypatch.setattr(ManagedProcess, "alive", lambda self: True)
    monkeypatch.setattr(runtime, "ollama_version", lambda host, timeout_s=2.0: host.rsplit(":", 1)[1])
    state = TestbedState()
    state.set_server(_server("0.13.5", 5000))
    state.set_server(_server("0.34.4", 5001, stripped=True))
    top_default = describe(state)
    assert top_default["ollama_host"] == "http://127.0.0.1:5000"
    assert [s["version"] for s in top_default["servers"]] == ["0.13.5", "0.34.4"]
    assert top_default["servers"][1]["stripped"] is True
    assert set(top_default["servers"][1]) >= {"host", "version", "binary", "log", "models", "pid"}
    top_v034 = describe(state, "0.34.4")
    assert top_v034["ollama_host"] == "http://127.0.0.1:5001"
    assert top_v034["ollama_version"] == "5001"
    assert top_v034["ollama_log"] == "/tb/ollama-0.34.4.log"


def test_server_files_keep_the_default_names(tmp_path: Path) -> None:
    assert server_files(tmp_path, "0.13.5") == (tmp_path / "ollama.log", tmp_path / "ollama-models")
    assert server_files(tmp_path, "0.34.4") == (tmp_path / "ollama-0.34.4.log", tmp_path / "ollama-models-0.34.4")


# --------------------------------------------------------------------------- builds


def test_ninja_counter_reads_the_newest(tmp_path: Path) -> None:
    log = tmp_path / "build.log"
    assert ninja_counter(log) is None
    log.write_text("[1/4] Building ggml\n[3/367] Building CXX object src/llama.cpp.o\nwarning: x\n")
    assert ninja_counter(log) == "[3/367]"
    with log.open("a") as handle:
        handle.write("[  8%] Built target ggml-base\n[ 12%] Building C object ggml-cpu.c.o\n")
    assert ninja_counter(log) == "[ 12%]"


def test_compat_patches_are_found_recursively_and_sorted(tmp_path: Path) -> None:
    compat = tmp_path / "llama" / "compat"
    (compat / "sub").mkdir(parents=True)
    for name in ("002-b.patch", "001-a.patch", "sub/003-c.patch", "README.md"):
        (compat / name).write_text("x")
    names = [p.relative_to(compat).as_posix() for p in llama_server_build.compat_patches(tmp_path)]
    assert names == ["001-a.patch", "002-b.patch", "sub/003-c.patch"]


def test_an_install_counts_only_when_complete(tmp_path: Path) -> None:
    root = llama_server_build.install_dir(tmp_path, "0.34.4")
    assert llama_server_build.built(tmp_path, "0.34.4") is None
    for relative in ("bin/ollama", "bin/ollama-stripped", "lib/ollama/llama-server"):
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("#!/bin/sh\n")
        path.chmod(0o755)
    assert llama_server_build.built(tmp_path, "0.34.4") is None  # no stamp: maybe half-copied
    (root / llama_server_build.STAMP_NAME).write_text(json.dumps({"ollama": "0.34.4"}))
    binaries = llama_server_build.built(tmp_path, "0.34.4")
    assert binaries is not None
    assert binaries.pick(stripped=True) == root / "bin" / "ollama-stripped"
    assert binaries.pick(stripped=False) == root / "bin" / "ollama"
    assert ollama_build.built_binaries(tmp_path, "0.34.4") == binaries


def test_the_default_build_keeps_its_cache_path(tmp_path: Path) -> None:
    legacy = ollama_build.ollama_binary_path(tmp_path, "0.13.5")
    assert legacy == tmp_path / "bin" / "ollama-0.13.5"
    legacy.parent.mkdir(parents=True)
    legacy.write_text("")
    binaries = ollama_build.built_binaries(tmp_path, "0.13.5")
    assert binaries is not None and binaries.stripped is None
    assert binaries.pick(stripped=True) == legacy


def _fake_go(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, error: str) -> None:
    bin_dir = tmp_path / "fakebin"
    bin_dir.mkdir()
    go = bin_dir / "go"
    payload = json.dumps({"Path": "github.com/ollama/ollama", "Version": "v0.99.0", "Error": error})
    go.write_text(f"#!{sys.executable}\nimport sys\nprint({payload!r})\nsys.exit(1)\n")
    go.chmod(go.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")


def test_a_version_the_proxy_refuses_is_not_served(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_go(tmp_path, monkeypatch, "github.com/ollama/ollama@v0.99.0: reading https://proxy.golang.org/"
             "github.com/ollama/ollama/@v/v0.99.0.info: 403 Forbidden\n\tserver response: not available.")
    with pytest.raises(TracerError) as exc:
        ollama_build.check_served(tmp_path, "0.99.0", lambda _m: None)
    assert exc.value.exit_code == ExitCode.VERSION_NOT_SERVED
    message = exc.value.message
    assert "0.99.0" in message and "go mod download" in message and "403 Forbidden" in message
    assert "\n" not in message and message.count(". ") == 0


def test_an_unreachable_proxy_is_a_build_failure(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _fake_go(tmp_path, monkeypatch, "dial tcp: lookup proxy.golang.org: no such host")
    with pytest.raises(TracerError) as exc:
        ollama_build.module_dir(tmp_path, lambda _m: None, "0.34.4")
    assert exc.value.exit_code == ExitCode.BUILD_FAILED
    assert "0.34.4" in exc.value.message


def test_a_failed_build_leaves_the_other_versions_running(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ollama_tracer.commands import testbed as command

    started: list[str] = []

    def ensure(cache: Path, version: str, progress: object) -> ollama_build.OllamaBinaries:
        if version == "0.34.4":
            raise TracerError("Ollama v0.34.4: compiling llama-server failed (exit 1); see the log.",
                              ExitCode.BUILD_FAILED)
        return ollama_build.OllamaBinaries(version=version, symbols=tmp_path / f"ollama-{version}")

    def server_up(state: TestbedState, state_path: Path, directory: Path, version: str, binary: Path, *,
                  stripped: bool, progress: object, restart: bool = False) -> None:
        started.append(version)

    monkeypatch.setenv("TRACER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ollama_build, "check_served", lambda cache, version, progress: None)
    monkeypatch.setattr(ollama_build, "ensure_ollama", ensure)
    monkeypatch.setattr(command, "_server_up", server_up)
    stopped: list[int] = []
    monkeypatch.setattr(ManagedProcess, "stop", lambda self, timeout_s=10.0: stopped.append(self.pid))
    with pytest.raises(TracerError) as exc:
        command.up(tmp_path, with_jaeger=False, progress=lambda _m: None, versions=["0.34.4", "0.13.5"])
    assert exc.value.exit_code == ExitCode.BUILD_FAILED and "0.34.4" in exc.value.message
    assert started == ["0.13.5"]  # the other version still came up
    assert stopped == []


def test_a_not_served_version_stops_before_anything_starts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from ollama_tracer.commands import testbed as command

    def check(cache: Path, version: str, progress: object) -> None:
        if version == "0.99.0":
            raise TracerError("Ollama 0.99.0 is not served by the Go module proxy.", ExitCode.VERSION_NOT_SERVED)

    monkeypatch.setenv("TRACER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setattr(ollama_build, "check_served", check)
    monkeypatch.setattr(ollama_build, "ensure_ollama", lambda *a: pytest.fail("nothing may be built"))
    with pytest.raises(TracerError) as exc:
        command.up(tmp_path, with_jaeger=False, progress=lambda _m: None, versions=["0.13.5", "0.99.0"])
    assert exc.value.exit_code == ExitCode.VERSION_NOT_SERVED
