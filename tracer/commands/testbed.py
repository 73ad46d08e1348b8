"""A local, real Ollama for trying the tracer and for its tests.

`tracer testbed up` builds Ollama v0.13.5 from source (once, into ~/.cache/ollama-tracer),
writes two synthetic GGUF models (gemma3-shaped with a 262k vocabulary, and a small llama),
registers them offline, and starts `ollama serve` on a free loopback port with OLLAMA_DEBUG=1.
With --with-jaeger it also builds and starts Jaeger v2 (OTLP 4317/4318, API 16686, loopback).

A second `up` reuses the builds and the running processes. `tracer testbed down` stops only
what `up` started. Set TRACER_CACHE_DIR or TRACER_TESTBED_DIR to move the cache or the state.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed import runtime
from ollama_tracer.testbed.ollama_build import build_ollama
from ollama_tracer.testbed.steps import Progress, cache_dir, stderr_progress

JAEGER_PORTS = {"otlp_grpc": 4317, "otlp_http": 4318, "query": 16686}


class TestbedCommand:
    """Start or stop a local, real Ollama testbed (and optionally Jaeger)."""

    __test__ = False
    name = "testbed"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        up = actions.add_parser("up", help="build (once) and start the testbed; reuses what runs")
        up.add_argument("--with-jaeger", action="store_true", help="also build and start Jaeger v2")
        up.add_argument("--json", action="store_true", help="print the testbed description as JSON")
        actions.add_parser("down", help="stop what `tracer testbed up` started")
        status = actions.add_parser("status", help="describe the running testbed")
        status.add_argument("--json", action="store_true", help="print as JSON")
        actions.add_parser("env", help="print `export OLLAMA_HOST=...` for the running testbed (use with eval)")

    def run(self, args: argparse.Namespace) -> int:
        directory = runtime.testbed_dir()
        state_path = directory / "state.json"
        if args.action == "down":
            return _down(state_path)
        if args.action in ("status", "env"):
            state = runtime.TestbedState.load(state_path)
            if state.ollama is None or not state.ollama.alive() or state.ollama_host is None:
                raise TracerError(
                    "no testbed is running; start one with `tracer testbed up`.",
                    ExitCode.OLLAMA_UNREACHABLE,
                )
            if args.action == "env":
                print(f"export OLLAMA_HOST={state.ollama_host}")
                return int(ExitCode.OK)
            return _print(_describe(state), args.json)
        state = up(directory, with_jaeger=args.with_jaeger, progress=stderr_progress)
        return _print(_describe(state), args.json)


def up(directory: Path, *, with_jaeger: bool, progress: Progress) -> runtime.TestbedState:
    """Build (once) and start the testbed, or reuse it. Concurrent callers (several test runs
    healing at once) take turns: the second finds the first's fresh server and reuses it."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "up.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _up(directory, with_jaeger=with_jaeger, progress=progress)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _up(directory: Path, *, with_jaeger: bool, progress: Progress) -> runtime.TestbedState:
    state_path = directory / "state.json"
    state = runtime.TestbedState.load(state_path)
    cache = cache_dir()
    binary = build_ollama(cache, progress)
    reusable = (
        state.ollama is not None
        and state.ollama.alive()
        and state.ollama_host is not None
        and state.ollama_binary == str(binary)
        and runtime.ollama_version(state.ollama_host) is not None
    )
    port = None
    if reusable and state.models and not runtime.models_respond(state.ollama_host or "", state.models):
        # Ollama v0.13's interrupt deadlock leaves a model that never answers again: restart,
        # on the same port so that clients holding the address keep working.
        progress(f"ollama serve (pid {state.ollama.pid if state.ollama else '?'}) has a model that no longer "
                 "answers (the v0.13 interrupt deadlock); restarting it")
        reusable = False
        port = int((state.ollama_host or "").rsplit(":", 1)[1])
    if reusable and state.ollama is not None:
        progress(f"reusing ollama serve (pid {state.ollama.pid}) on {state.ollama_host}")
    else:
        if state.ollama is not None:
            state.ollama.stop()
        state.ollama, state.ollama_host = runtime.start_ollama(binary, directory, progress, port=port)
        state.ollama_binary = str(binary)
        state.save(state_path)
    assert state.ollama_host is not None
    state.models = runtime.ensure_models(binary, state.ollama_host, directory, progress)
    state.save(state_path)
    if with_jaeger:
        _jaeger_up(state, cache, directory, progress)
        state.save(state_path)
    return state


def _jaeger_up(state: runtime.TestbedState, cache: Path, directory: Path, progress: Progress) -> None:
    from ollama_tracer.testbed import jaeger

    endpoints = {
        "otlp_grpc": f"http://127.0.0.1:{JAEGER_PORTS['otlp_grpc']}",
        "otlp_http": f"http://127.0.0.1:{JAEGER_PORTS['otlp_http']}",
        "query": f"http://127.0.0.1:{JAEGER_PORTS['query']}",
    }
    if state.jaeger is not None and state.jaeger.alive():
        progress(f"reusing Jaeger (pid {state.jaeger.pid}) on {endpoints['query']}")
        state.jaeger_endpoints = endpoints
        return
    binary = jaeger.build_jaeger(cache, progress)
    config = jaeger.write_jaeger_config(
        directory / "jaeger.yaml",
        otlp_grpc_port=JAEGER_PORTS["otlp_grpc"],
        otlp_http_port=JAEGER_PORTS["otlp_http"],
        query_port=JAEGER_PORTS["query"],
    )
    log = directory / "jaeger.log"
    progress(f"starting Jaeger on {endpoints['query']} (log: {log})")
    proc = jaeger.start_jaeger(binary, config, log)
    state.jaeger = runtime.ManagedProcess(pid=proc.pid, argv=[str(binary)], log=str(log))
    jaeger.wait_jaeger_ready(endpoints["query"], timeout_s=60)
    state.jaeger_endpoints = endpoints


def _down(state_path: Path) -> int:
    state = runtime.TestbedState.load(state_path)
    stopped = []
    for label, proc in (("ollama", state.ollama), ("jaeger", state.jaeger)):
        if proc is not None and proc.alive():
            proc.stop()
            stopped.append(f"{label} (pid {proc.pid})")
    state.ollama = state.jaeger = None
    state.jaeger_endpoints = None
    state.save(state_path)
    print("stopped " + ", ".join(stopped) if stopped else "nothing to stop")
    return int(ExitCode.OK)


def _describe(state: runtime.TestbedState) -> dict[str, Any]:
    host = state.ollama_host or ""
    return {
        "ollama_host": host,
        "ollama_version": runtime.ollama_version(host) if host else None,
        "ollama_binary": state.ollama_binary,
        "ollama_log": state.ollama.log if state.ollama else None,
        "ollama_pid": state.ollama.pid if state.ollama else None,
        "models": state.models,
        "jaeger": state.jaeger_endpoints if state.jaeger and state.jaeger.alive() else None,
    }


def _print(description: dict[str, Any], as_json: bool) -> int:
    if as_json:
        json.dump(description, sys.stdout, indent=2)
        print()
        return int(ExitCode.OK)
    print(f"Ollama {description['ollama_version']} at {description['ollama_host']}")
    print(f"  binary: {description['ollama_binary']}")
    print(f"  log:    {description['ollama_log']}")
    print(f"  models: {', '.join(description['models'])}")
    if description["jaeger"]:
        j = description["jaeger"]
        print(f"Jaeger: OTLP {j['otlp_grpc']} (gRPC), {j['otlp_http']} (HTTP); API {j['query']}")
    print(f"\nTry it:  export OLLAMA_HOST={description['ollama_host']}")
    return int(ExitCode.OK)
