"""A local, real Ollama for trying the tracer and for its tests.

`tracer testbed up` builds Ollama v0.13.5 from source (once, into ~/.cache/ollama-tracer),
writes two synthetic GGUF models (gemma3-shaped with a 262k vocabulary, and a small llama),
registers them offline, and starts `ollama serve` on a free loopback port with OLLAMA_DEBUG=1.
With --with-jaeger it also builds and starts Jaeger v2 (OTLP 4317/4318, API 16686, loopback).

`--ollama VERSION` (repeatable, or comma-separated) picks other releases the Go module proxy
serves, e.g. `--ollama 0.13.5 --ollama 0.34.4` runs both, each on its own port with the same
models. v0.30+ (llama-server releases) build llama.cpp from llama-cpp-python's sdist on PyPI;
`--stripped` runs their release-form (-s -w) binary instead of the one with symbols.

`--layout system` installs a v0.30+ release the way the official Linux installer does (PREFIX/bin,
PREFIX/lib/ollama, a system user `ollama`, the unit's cgroup, the journal: `journalctl -u ollama`);
`--layout container` runs it in its own PID and mount namespaces and root filesystem, published
through Docker's docker-proxy (tracer.testbed.layouts says exactly what each is).

A second `up` reuses the builds and the running processes. `tracer testbed down` stops only
what `up` started. Set TRACER_CACHE_DIR or TRACER_TESTBED_DIR to move the cache or the state.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import Any

from ollama_tracer.deployment import server_pid
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed import layouts, ollama_build, runtime, standalone
from ollama_tracer.testbed.steps import Progress, cache_dir, stderr_progress

JAEGER_PORTS = {"otlp_grpc": 4317, "otlp_http": 4318, "query": 16686}
DEFAULT_VERSION = ollama_build.OLLAMA_VERSION


def parse_versions(text: str) -> list[str]:
    """argparse ``type`` for ``--ollama``: ``0.13.5`` or ``0.13.5,v0.34.4`` -> versions."""
    versions = []
    for part in text.split(","):
        if not part.strip():
            continue
        try:
            versions.append(ollama_build.normalize_version(part))
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from err
    if not versions:
        raise argparse.ArgumentTypeError("expected a version such as 0.13.5 or 0.34.4")
    return versions


def requested_versions(groups: list[list[str]] | None) -> list[str]:
    """The flattened ``--ollama`` values, duplicates dropped, in order; the default when none."""
    seen: list[str] = []
    for group in groups or [[DEFAULT_VERSION]]:
        for version in group:
            if version not in seen:
                seen.append(version)
    return seen


class TestbedCommand:
    """Start or stop a local, real Ollama testbed (and optionally Jaeger)."""

    __test__ = False
    name = "testbed"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        actions = parser.add_subparsers(dest="action", metavar="ACTION", required=True)
        version_help = (f"Ollama release to build and run (default {DEFAULT_VERSION}); repeat it or "
                        "separate versions with commas to run several at once, e.g. 0.13.5,0.34.4")
        up = actions.add_parser("up", help="build (once) and start the testbed; reuses what runs")
        up.add_argument("--ollama", metavar="VERSION", action="append", type=parse_versions, help=version_help)
        up.add_argument("--stripped", action="store_true",
                        help="run the release-form (-s -w, no ELF symbols) binary of versions that have one "
                             "(v0.30+); the eBPF collector needs symbols, so the default keeps them")
        up.add_argument("--layout", choices=layouts.LAYOUTS, default=layouts.PLAIN,
                        help="plain: a child process logging to a file (default); system: installed under "
                             "--prefix and run as user `ollama`, logging to the journal; container: in its own "
                             "namespaces and root, behind docker-proxy")
        up.add_argument("--prefix", type=Path, default=layouts.DEFAULT_PREFIX,
                        help=f"where --layout system installs bin/ollama and lib/ollama (default "
                             f"{layouts.DEFAULT_PREFIX}, as the official installer)")
        up.add_argument("--with-jaeger", action="store_true", help="also build and start Jaeger v2")
        up.add_argument("--llama-server", action="store_true",
                        help="also start upstream llama.cpp's llama-server alone (no Ollama in front), one per "
                             f"synthetic model, from the v{standalone.LLAMA_SERVER_FROM} build (built if missing)")
        up.add_argument("--restart", action="store_true",
                        help="restart the servers of these versions and layout even when they answer, on the "
                             "same ports (a server left in a bad state); without it, a running server is "
                             "reused unless a model no longer answers")
        up.add_argument("--json", action="store_true", help="print the testbed description as JSON")
        down = actions.add_parser("down", help="stop what `tracer testbed up` started")
        down.add_argument("--ollama", metavar="VERSION", action="append", type=parse_versions,
                          help="stop only the servers of these versions (default: everything, Jaeger too)")
        down.add_argument("--layout", choices=layouts.LAYOUTS, help="stop only the servers of this layout")
        status = actions.add_parser("status", help="describe the running testbed")
        status.add_argument("--ollama", metavar="VERSION", type=ollama_build.normalize_version,
                            help="the server whose fields go at the top level (default: the default server)")
        status.add_argument("--layout", choices=layouts.LAYOUTS, default=layouts.PLAIN,
                            help="with --ollama: the layout of the server to put at the top level")
        status.add_argument("--json", action="store_true", help="print as JSON")
        env = actions.add_parser("env", help="print `export OLLAMA_HOST=...` for the running testbed (use with eval)")
        env.add_argument("--ollama", metavar="VERSION", type=ollama_build.normalize_version,
                         help="the version whose server to point at (default: the default server)")
        env.add_argument("--layout", choices=layouts.LAYOUTS, default=layouts.PLAIN,
                         help="with --ollama: the layout of that version's server")

    def run(self, args: argparse.Namespace) -> int:
        directory = runtime.testbed_dir()
        state_path = directory / "state.json"
        if args.action == "down":
            versions = requested_versions(args.ollama) if args.ollama else None
            return _down(state_path, versions, args.layout)
        if args.action in ("status", "env"):
            state = runtime.TestbedState.load(state_path)
            key = runtime.server_key(args.ollama, args.layout) if args.ollama else None
            server = _running_server(state, key)
            if args.action == "env":
                print(f"export OLLAMA_HOST={server.host}")
                return int(ExitCode.OK)
            return _print(describe(state, server.key), args.json)
        versions = requested_versions(args.ollama)
        state = up(directory, with_jaeger=args.with_jaeger, progress=stderr_progress,
                   versions=versions, stripped=args.stripped, layout=args.layout, prefix=args.prefix,
                   restart=args.restart)
        if args.llama_server:
            standalone.up(directory, stderr_progress)
        return _print(describe(state, runtime.server_key(versions[0], args.layout)), args.json)


def _running_server(state: runtime.TestbedState, version: str | None) -> runtime.OllamaServer:
    if version is not None:
        server = state.server(version)
        if server is None or not server.alive():
            raise TracerError(
                f"no testbed server for Ollama {version} is running; start one with "
                f"`tracer testbed up --ollama {version}`.",
                ExitCode.OLLAMA_UNREACHABLE,
            )
        return server
    running = state.running_servers()
    primary = state.primary()
    if primary is not None and primary in running:
        return primary
    if running:
        return running[0]
    raise TracerError("no testbed is running; start one with `tracer testbed up`.", ExitCode.OLLAMA_UNREACHABLE)


def up(directory: Path, *, with_jaeger: bool, progress: Progress, versions: list[str] | None = None,
       stripped: bool = False, layout: str = layouts.PLAIN,
       prefix: Path = layouts.DEFAULT_PREFIX, restart: bool = False) -> runtime.TestbedState:
    """Build (once) and start the testbed, or reuse it (``restart``: start the named servers
    afresh, on their ports, even if they answer). Concurrent callers (several test runs healing at
    once) take turns: the second finds the first's fresh server and reuses it."""
    import fcntl

    directory.mkdir(parents=True, exist_ok=True)
    with (directory / "up.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            return _up(directory, with_jaeger=with_jaeger, progress=progress,
                       versions=versions or [DEFAULT_VERSION], stripped=stripped, layout=layout, prefix=prefix,
                       restart=restart)
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _up(directory: Path, *, with_jaeger: bool, progress: Progress, versions: list[str],
        stripped: bool, layout: str = layouts.PLAIN, prefix: Path = layouts.DEFAULT_PREFIX,
        restart: bool = False) -> runtime.TestbedState:
    state_path = directory / "state.json"
    state = runtime.TestbedState.load(state_path)
    cache = cache_dir()
    # Forget servers that died (their versions may be started again below); keep the rest running.
    for server in list(state.servers):
        if not server.alive():
            server.stop()  # a container whose forwarder died: stop the rest of it too
            state.remove_server(server.key)
    # A version the proxy does not serve fails here, before anything is built, started or stopped.
    for version in versions:
        ollama_build.check_served(cache, version, progress)
    failure: TracerError | None = None
    for version in versions:
        try:
            binaries = ollama_build.ensure_ollama(cache, version, progress)
            if stripped and binaries.stripped is None:
                progress(f"Ollama v{version} has no release-form build in the testbed; running {binaries.symbols}")
            if layout == layouts.PLAIN:
                _server_up(state, state_path, directory, version, binaries.pick(stripped),
                           stripped=stripped and binaries.stripped is not None, progress=progress, restart=restart)
            else:
                _deployed_up(state, state_path, directory, version, binaries, layout=layout, prefix=prefix,
                             stripped=stripped, progress=progress, restart=restart)
        except TracerError as err:
            # Other versions' builds and servers stay as they are; report the first failure at the end.
            progress(f"Ollama v{version}: {err.message}")
            failure = failure or err
    if with_jaeger and failure is None:
        _jaeger_up(state, cache, directory, progress)
        state.save(state_path)
    if failure is not None:
        raise failure
    return state


def _server_up(state: runtime.TestbedState, state_path: Path, directory: Path, version: str, binary: Path, *,
               stripped: bool, progress: Progress, restart: bool = False) -> None:
    existing = state.server(version)
    if restart and existing is not None and existing.process.alive():
        progress(f"restarting ollama serve {version} (pid {existing.process.pid}), as asked")
    reusable = (
        not restart
        and existing is not None
        and existing.process.alive()
        and existing.binary == str(binary)
        and runtime.ollama_version(existing.host) is not None
    )
    port = existing.port if existing is not None else None
    if reusable and existing is not None and existing.models and not runtime.models_respond(existing.host,
                                                                                           existing.models):
        # The interrupt stall (v0.13's runner deadlock, v0.34's llama-server stall; README) leaves a
        # model that never answers again: restart, on the same port so that clients holding the
        # address keep working.
        progress(f"ollama serve {version} (pid {existing.process.pid}) has a model that no longer "
                 "answers (the interrupt stall); restarting it")
        reusable = False
    log, models_dir = runtime.server_files(directory, version)
    if reusable and existing is not None:
        progress(f"reusing ollama serve {version} (pid {existing.process.pid}) on {existing.host}")
        server = existing
    else:
        if existing is not None:
            existing.process.stop()  # a dead, stuck or other-binary server of this same version
            state.remove_server(version)
            state.save(state_path)
        process, host = runtime.start_ollama(binary, directory, progress, port=port, log=log, models_dir=models_dir)
        server = runtime.OllamaServer(version=version, host=host, binary=str(binary), process=process,
                                      stripped=stripped)
        state.set_server(server)
        state.save(state_path)
    create_log = directory / ("ollama-create.log" if version == DEFAULT_VERSION else f"ollama-create-{version}.log")
    server.models = runtime.ensure_models(binary, server.host, directory, progress,
                                          server_log=log, create_log=create_log)
    state.set_server(server)
    state.save(state_path)


def _deployed_up(state: runtime.TestbedState, state_path: Path, directory: Path, version: str,
                 binaries: ollama_build.OllamaBinaries, *, layout: str, prefix: Path, stripped: bool,
                 progress: Progress, restart: bool = False) -> None:
    """A server of the system or container layout (``testbed.layouts``), from the release tree."""
    release = binaries.symbols.parent.parent
    if not (release / "lib" / "ollama").is_dir():
        # A one-binary build (v0.13's: its CPU backend is linked in): the release tree has an empty lib/ollama.
        release = directory / f"release-{version}"
        (release / "bin").mkdir(parents=True, exist_ok=True)
        (release / "lib" / "ollama").mkdir(parents=True, exist_ok=True)
        if not (release / "bin" / "ollama").exists() or (release / "bin" / "ollama").stat().st_mtime_ns != \
                binaries.symbols.stat().st_mtime_ns:
            shutil.copy2(binaries.symbols, release / "bin" / "ollama")
    key = runtime.server_key(version, layout)
    existing = state.server(key)
    if restart and existing is not None and existing.alive():
        progress(f"restarting the {layout} server {version} on {existing.host}, as asked")
    if not restart and existing is not None and existing.alive() and \
            runtime.ollama_version(existing.host) is not None and (
            not existing.models or runtime.models_respond(existing.host, existing.models)):
        progress(f"reusing the {layout} server {version} on {existing.host}")
        server = existing
    else:
        port = existing.port if existing is not None else None
        if existing is not None:
            existing.stop()
            state.remove_server(key)
            state.save(state_path)
        tree = release
        if stripped and binaries.stripped is not None:  # the release form in the tree's bin/
            tree = directory / f"release-{version}-stripped"
            (tree / "bin").mkdir(parents=True, exist_ok=True)
            shutil.copy2(binaries.stripped, tree / "bin" / "ollama")
            if not (tree / "lib").exists():
                (tree / "lib").symlink_to(release / "lib")
        if layout == layouts.SYSTEM:
            for other in [s for s in state.servers if s.layout == layouts.SYSTEM]:  # one ollama.service at a time
                progress(f"stopping the system server {other.version}: the unit, user and prefix are one per machine")
                other.stop()
                state.remove_server(other.key)
            binary = layouts.install_system(tree, prefix, progress)
            process, host, journal = layouts.start_system(binary, directory, progress, port=port)
            server = runtime.OllamaServer(version=version, host=host, binary=str(binary), process=process,
                                          stripped=stripped, layout=layout,
                                          log_source={"unit": layouts.UNIT, "journal": str(journal)})
        else:
            processes, host, log = layouts.start_container(tree, version, directory / f"ollama-models-{version}",
                                                           directory, progress, port=port)
            process, helpers = processes[0], processes[1:]
            server = runtime.OllamaServer(version=version, host=host, binary="/usr/bin/ollama", process=process,
                                          stripped=stripped, layout=layout, helpers=helpers,
                                          log_source={"file": str(log), "format": "json-file"})
        state.set_server(server)
        state.save(state_path)
    server.models = runtime.ensure_models(binaries.symbols, server.host, directory, progress,
                                          create_log=directory / f"ollama-create-{key}.log")
    state.set_server(server)
    state.save(state_path)


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


def _down(state_path: Path, versions: list[str] | None = None, layout: str | None = None) -> int:
    """Stop the servers of ``versions`` and ``layout`` (None: every server, and Jaeger when both are None)."""
    state = runtime.TestbedState.load(state_path)
    stopped = []
    for server in list(state.servers):
        if versions is not None and server.version not in versions:
            continue
        if layout is not None and server.layout != layout:
            continue
        if server.process.alive():
            stopped.append(f"ollama {server.key} (pid {server.process.pid})")
        server.stop()
        state.remove_server(server.key)
    if versions is None and layout is None:
        stopped += standalone.down(state_path.parent)
        if state.jaeger is not None and state.jaeger.alive():
            state.jaeger.stop()
            stopped.append(f"jaeger (pid {state.jaeger.pid})")
        state.jaeger = None
        state.jaeger_endpoints = None
    state.save(state_path)
    print("stopped " + ", ".join(stopped) if stopped else "nothing to stop")
    return int(ExitCode.OK)


def describe_server(server: runtime.OllamaServer) -> dict[str, Any]:
    return {
        "version": server.version,
        "layout": server.layout,
        "key": server.key,
        "host": server.host,
        "reported_version": runtime.ollama_version(server.host),
        "binary": server.binary,
        "stripped": server.stripped,
        "log": server.log_file,
        "unit": server.log_source.get("unit"),
        "pid": server.process.pid,
        "server_pid": server_pid(server.host),
        "models": list(server.models),
    }


def describe(state: runtime.TestbedState, version: str | None = None) -> dict[str, Any]:
    """The top-level fields describe ``version``'s server (default: the primary one);
    ``servers`` lists every running server."""
    servers = [describe_server(s) for s in state.running_servers()]
    chosen = state.server(version) if version is not None else None
    top = chosen or state.primary()
    host = top.host if top else ""
    top_description = next((d for d in servers if top is not None and d["key"] == top.key), None)
    return {
        "ollama_host": host,
        "ollama_version": (top_description["reported_version"] if top_description
                           else runtime.ollama_version(host) if host else None),
        "ollama_binary": top.binary if top else None,
        "ollama_log": top.log_file if top else None,
        "ollama_unit": top.log_source.get("unit") if top else None,
        "ollama_pid": top.process.pid if top else None,
        "models": list(top.models) if top else [],
        "jaeger": state.jaeger_endpoints if state.jaeger and state.jaeger.alive() else None,
        "servers": servers,
        "llama_servers": [{"model": s.model, "host": s.host, "gguf": s.gguf, "pid": s.process.pid,
                           "log": s.process.log} for s in standalone.running(runtime.testbed_dir())],
    }


def _print(description: dict[str, Any], as_json: bool) -> int:
    if as_json:
        json.dump(description, sys.stdout, indent=2)
        print()
        return int(ExitCode.OK)
    for server in description["servers"]:
        kind = " (stripped release build)" if server["stripped"] else ""
        layout = f", {server['layout']} layout" if server.get("layout", "plain") != "plain" else ""
        print(f"Ollama {server['reported_version'] or server['version']} at {server['host']}{kind}{layout}")
        print(f"  binary: {server['binary']}" + (f" (server pid {server['server_pid']})" if layout else ""))
        print(f"  log:    {server['log'] or 'journalctl -u ' + str(server.get('unit'))}")
        print(f"  models: {', '.join(server['models'])}")
    for engine in description["llama_servers"]:
        print(f"llama-server (llama.cpp alone) for {engine['model']} at {engine['host']}")
        print(f"  log:    {engine['log']}")
    if description["jaeger"]:
        j = description["jaeger"]
        print(f"Jaeger: OTLP {j['otlp_grpc']} (gRPC), {j['otlp_http']} (HTTP); API {j['query']}")
    print(f"\nTry it:  export OLLAMA_HOST={description['ollama_host']}")
    return int(ExitCode.OK)
