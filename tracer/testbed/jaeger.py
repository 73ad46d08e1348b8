"""Jaeger v2 for the testbed: built from the Go module proxy, configured loopback-only.

Why build it: there is no Docker engine here and no GitHub access, but the Go module proxy
serves Jaeger's source, and Jaeger v2 (an OpenTelemetry Collector distribution) is a plain
``go build`` with no cgo and no UI assets needed for the ``/api/traces`` HTTP API.

Why a wrapper module: ``github.com/jaegertracing/jaeger`` v1.76.0 (= Jaeger v2.13.0) has
``replace`` directives in its go.mod, and ``go install pkg@version`` refuses any module that
has them. A tiny module that requires Jaeger and repeats the same directives builds the very
same dependency graph, because Jaeger's go.mod lists every requirement (module graph pruning).
The directives are read from the downloaded go.mod rather than hard-coded, so a version bump
keeps working.

Why loopback only: the testbed must not expose an unauthenticated trace store on the
network, so the written config binds every listener to 127.0.0.1 and drops every component
the testbed does not use (Jaeger/Zipkin receivers, remote sampling, health check, expvar,
zpages, pprof, the Prometheus self-metrics endpoint on 8888).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed.steps import require_tool, run_step

JAEGER_MODULE = "github.com/jaegertracing/jaeger"
JAEGER_MODULE_VERSION = "v1.76.0"
# The Jaeger v2 release built from module version v1.76.0 (its CHANGELOG: "v1.76.0 / v2.13.0").
# Only used for `jaeger --version` via -ldflags, so that logs name the real release.
JAEGER_V2_VERSION = "v2.13.0"
JAEGER_PACKAGE = f"{JAEGER_MODULE}/cmd/jaeger"

DEFAULT_OTLP_GRPC_PORT = 4317
DEFAULT_OTLP_HTTP_PORT = 4318
DEFAULT_QUERY_HTTP_PORT = 16686
DEFAULT_QUERY_GRPC_PORT = 16685

# How often a long `go` step reports that it is still alive: a silent multi-minute build
# looks hung, and a per-line echo would flood the terminal.
PROGRESS_INTERVAL_S = 15.0

_WRAPPER_MODULE = "ollama-tracer.local/jaeger-build"


# --------------------------------------------------------------------------- building


def jaeger_binary_path(cache_dir: Path) -> Path:
    """Where :func:`build_jaeger` puts the binary, so callers can check without building."""
    return cache_dir / "bin" / "jaeger"


def _stamp_path(cache_dir: Path) -> Path:
    return cache_dir / "bin" / "jaeger.stamp"


def _stamp_content() -> dict[str, str]:
    return {"module": JAEGER_MODULE, "version": JAEGER_MODULE_VERSION, "package": JAEGER_PACKAGE}


def _is_built(cache_dir: Path) -> bool:
    """A binary counts only with a matching stamp: a half-written or older binary is rebuilt."""
    binary = jaeger_binary_path(cache_dir)
    stamp = _stamp_path(cache_dir)
    if not (binary.is_file() and os.access(binary, os.X_OK) and stamp.is_file()):
        return False
    try:
        recorded = json.loads(stamp.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return bool(recorded == _stamp_content())


def _go_env() -> dict[str, str]:
    """The environment for every `go` call.

    ``-mod=mod`` lets `go build` fill in go.sum for the wrapper module; GOCACHE and GOMODCACHE
    stay at Go's defaults (stable per user), so a rebuild after a cache-dir wipe reuses them.
    """
    env = dict(os.environ)
    flags = env.get("GOFLAGS", "").split()
    flags = [f for f in flags if not f.startswith("-mod=")] + ["-mod=mod"]
    env["GOFLAGS"] = " ".join(flags)
    # A wrapper module must never be mistaken for part of an enclosing workspace.
    env["GOWORK"] = "off"
    env.setdefault("CGO_ENABLED", "0")  # Jaeger needs no cgo; a static binary is simpler
    return env


def _go_output(args: list[str], *, cwd: Path, env: dict[str, str], step: str, log_path: Path) -> str:
    """Run a short `go` query whose stdout we need to parse (its stderr goes to the log)."""
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"\n$ (cd {cwd} && {' '.join(args)})\n")
        log.flush()
        try:
            done = subprocess.run(
                args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=log, text=True, check=False
            )
        except OSError as exc:
            raise TracerError(
                f"Building Jaeger failed at step '{step}' because '{args[0]}' could not be started "
                f"({exc}); install Go 1.24 or newer and put it on PATH.",
                ExitCode.MISSING_DEPENDENCY,
            ) from exc
        log.write(done.stdout)
        log.write(f"# exit status {done.returncode}\n")
    if done.returncode != 0:
        raise TracerError(
            f"Building Jaeger failed at step '{step}' (exit status {done.returncode}); read {log_path} "
            "for the cause, fix it (usually network access to the Go module proxy) and rerun.",
            ExitCode.BUILD_FAILED,
        )
    return done.stdout


def _module_ref(ref: dict[str, Any]) -> str:
    """``path`` or ``path@version``, the form `go mod edit -replace/-exclude` takes."""
    path = str(ref["Path"])
    version = ref.get("Version")
    return f"{path}@{version}" if version else path


def _upstream_directives(
    go: str, *, cwd: Path, env: dict[str, str], log_path: Path
) -> tuple[str, list[dict[str, Any]], list[dict[str, Any]]]:
    """Download the Jaeger module and return its ``go`` version, replaces and excludes.

    `go mod download -json` tells us where the go.mod is; `go mod edit -json` parses it with
    Go's own parser, which is sturdier than reading the text ourselves.
    """
    step = f"go mod download {JAEGER_MODULE}@{JAEGER_MODULE_VERSION}"
    info = json.loads(
        _go_output(
            [go, "mod", "download", "-json", f"{JAEGER_MODULE}@{JAEGER_MODULE_VERSION}"],
            cwd=cwd,
            env=env,
            step=step,
            log_path=log_path,
        )
    )
    if info.get("Error") or not info.get("GoMod"):
        raise TracerError(
            f"Building Jaeger failed at step '{step}' ({info.get('Error', 'no go.mod returned')}); "
            f"read {log_path}, check that the Go module proxy is reachable (go env GOPROXY) and rerun.",
            ExitCode.BUILD_FAILED,
        )
    parsed = json.loads(
        _go_output(
            [go, "mod", "edit", "-json", str(info["GoMod"])],
            cwd=cwd,
            env=env,
            step="go mod edit -json (read Jaeger's go.mod)",
            log_path=log_path,
        )
    )
    return (
        str(parsed.get("Go") or "1.24"),
        list(parsed.get("Replace") or []),
        list(parsed.get("Exclude") or []),
    )


def _wrapper_go_mod(go_version: str, replaces: list[dict[str, Any]], excludes: list[dict[str, Any]]) -> str:
    """The wrapper's go.mod: require Jaeger and repeat its module-path replaces and excludes.

    A replace whose target is a directory (no version) points inside Jaeger's own repository
    and cannot be reproduced from the proxy; it is left out with a comment, and the build
    either still works or fails with the reason in the log.
    """
    lines = [
        "// Generated by tracer.testbed.jaeger: a wrapper so that `go build` accepts Jaeger's replace",
        "// directives, which `go install pkg@version` refuses.",
        f"module {_WRAPPER_MODULE}",
        "",
        f"go {go_version}",
        "",
        f"require {JAEGER_MODULE} {JAEGER_MODULE_VERSION}",
        "",
    ]
    for rep in replaces:
        old, new = rep["Old"], rep["New"]
        if not new.get("Version"):
            lines.append(
                f"// skipped (directory replace, not in the proxy): {_module_ref(old)} => {new['Path']}"
            )
            continue
        old_ref = f"{old['Path']} {old['Version']}" if old.get("Version") else old["Path"]
        lines.append(f"replace {old_ref} => {new['Path']} {new['Version']}")
    for exc in excludes:
        lines.append(f"exclude {exc['Path']} {exc['Version']}")
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _build_lock(cache_dir: Path) -> Iterator[None]:
    """Serialize builds: two `tracer` processes must not write one binary at the same time."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / "jaeger-build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def build_jaeger(cache_dir: Path, progress: Callable[[str], None]) -> Path:
    """Build Jaeger v2 into ``cache_dir/bin/jaeger`` and return its path.

    Idempotent: a binary with a stamp naming this module version returns at once, so only
    the first run pays the few minutes of compilation. Output of every `go` command goes to
    ``cache_dir/jaeger-build.log``; ``progress`` gets a one-line message per step and every
    :data:`PROGRESS_INTERVAL_S` seconds while a step runs.

    Raises :class:`TracerError` with ``ExitCode.BUILD_FAILED`` when a step fails, and with
    ``ExitCode.MISSING_DEPENDENCY`` when there is no Go toolchain.
    """
    binary = jaeger_binary_path(cache_dir)
    if _is_built(cache_dir):
        return binary
    go = require_tool("go", "building Jaeger needs Go 1.24 or newer (https://go.dev/dl/) on PATH")
    with _build_lock(cache_dir):
        if _is_built(cache_dir):  # another process finished while we waited for the lock
            return binary
        started = time.monotonic()
        log_path = cache_dir / "jaeger-build.log"
        wrapper = cache_dir / "jaeger-build"
        wrapper.mkdir(parents=True, exist_ok=True)
        binary.parent.mkdir(parents=True, exist_ok=True)
        env = _go_env()
        log_path.write_text(f"# building {JAEGER_PACKAGE}@{JAEGER_MODULE_VERSION}\n", encoding="utf-8")

        progress(f"downloading {JAEGER_MODULE}@{JAEGER_MODULE_VERSION} from the Go module proxy")
        go_version, replaces, excludes = _upstream_directives(go, cwd=wrapper, env=env, log_path=log_path)
        (wrapper / "go.mod").write_text(_wrapper_go_mod(go_version, replaces, excludes), encoding="utf-8")
        # go.sum is derived; a stale one from an older version would only add noise.
        (wrapper / "go.sum").unlink(missing_ok=True)

        tmp_binary = binary.with_name(binary.name + ".tmp")
        ldflags = f"-X {JAEGER_MODULE}/internal/version.latestVersion={JAEGER_V2_VERSION}"
        run_step(
            "building jaeger (a few minutes the first time)",
            [go, "build", "-v", "-trimpath", "-ldflags", ldflags, "-o", str(tmp_binary), JAEGER_PACKAGE],
            log_path=log_path,
            progress=progress,
            fix="usually network access to the Go module proxy or disk space; fix it and rerun",
            cwd=wrapper,
            env=env,
            every_s=PROGRESS_INTERVAL_S,
        )
        # Rename, then stamp: a crash in between leaves no stamp, so the next run rebuilds.
        tmp_binary.replace(binary)
        _stamp_path(cache_dir).write_text(json.dumps(_stamp_content(), indent=2) + "\n", encoding="utf-8")
        progress(f"built {binary} in {time.monotonic() - started:.0f} s")
    return binary


# --------------------------------------------------------------------------- configuration


def write_jaeger_config(
    path: Path,
    otlp_grpc_port: int = DEFAULT_OTLP_GRPC_PORT,
    otlp_http_port: int = DEFAULT_OTLP_HTTP_PORT,
    query_port: int = DEFAULT_QUERY_HTTP_PORT,
    host: str = "127.0.0.1",
    *,
    query_grpc_port: int = DEFAULT_QUERY_GRPC_PORT,
    max_traces: int = 100_000,
) -> Path:
    """Write a Jaeger v2 config: in-memory storage, OTLP in, query API out, nothing else.

    The schema is the OpenTelemetry Collector's, with Jaeger's extensions, as in v1.76.0's
    ``cmd/jaeger/internal/all-in-one.yaml``. Differences from that file, and why:

    * only the ``otlp`` receiver: the tracer exports OTLP; Jaeger-thrift and Zipkin
      receivers would open five more ports for nothing;
    * no ``remote_sampling``, ``healthcheckv2``, ``expvar`` or ``zpages`` extensions, each of
      which listens on a port; readiness is checked on the query API instead;
    * ``service.telemetry.metrics.level: none`` so no Prometheus endpoint opens on 8888;
    * the query extension's gRPC server, which always starts, is bound to ``host`` as well;
    * ``enable_tracing: false`` so Jaeger's own query spans do not show up as a service
      next to the ones under test.

    Written as plain text (no YAML library at run time); every value is a number or a
    fixed identifier, so no quoting is needed beyond the endpoint strings.
    """
    for name, port in (
        ("otlp_grpc_port", otlp_grpc_port),
        ("otlp_http_port", otlp_http_port),
        ("query_port", query_port),
        ("query_grpc_port", query_grpc_port),
    ):
        if not 0 < port < 65536:
            raise ValueError(f"{name}={port} is not a TCP port")
    ports = [otlp_grpc_port, otlp_http_port, query_port, query_grpc_port]
    if len(set(ports)) != len(ports):
        raise ValueError(f"Jaeger ports must be distinct, got {ports}")
    # IPv6 literals need brackets in host:port.
    h = f"[{host}]" if ":" in host and not host.startswith("[") else host
    text = f"""\
# Jaeger v2 ({JAEGER_V2_VERSION}, module {JAEGER_MODULE_VERSION}) config written by tracer.testbed.jaeger.
# In-memory storage, OTLP receivers and the query API only; every listener on {host}.
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    resource:
      service.name: jaeger
    metrics:
      level: none
    logs:
      level: info

extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: {max_traces}

  jaeger_query:
    storage:
      traces: memstore
    enable_tracing: false
    http:
      endpoint: "{h}:{query_port}"
    grpc:
      endpoint: "{h}:{query_grpc_port}"

receivers:
  otlp:
    protocols:
      grpc:
        endpoint: "{h}:{otlp_grpc_port}"
      http:
        endpoint: "{h}:{otlp_http_port}"

processors:
  batch:
    timeout: 100ms

exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
"""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- running


def start_jaeger(binary: Path, config: Path, log_path: Path) -> subprocess.Popen[bytes]:
    """Start Jaeger with ``config``, its output going to ``log_path``.

    ``start_new_session=True`` puts it in its own process group, so Ctrl-C in the terminal
    does not kill it mid-export and :func:`stop_jaeger` can signal the whole group.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with log_path.open("ab") as log:
        # The child keeps its own copy of the descriptor; ours closes when the block ends.
        return subprocess.Popen(
            [str(binary), "--config", f"file:{config.resolve()}"],
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def wait_jaeger_ready(
    query_url: str,
    timeout_s: float,
    *,
    process: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
) -> None:
    """Poll ``GET {query_url}/api/services`` until it answers 200.

    The OTLP receivers start before the query extension answers, so a 200 here means the
    whole pipeline is up. Given ``process``, a Jaeger that exits (bad config, port in use)
    fails at once instead of after ``timeout_s``. Proxies are bypassed: the URL is loopback.
    """
    url = query_url.rstrip("/") + "/api/services"
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    where = f"; see {log_path}" if log_path else ""
    deadline = time.monotonic() + timeout_s
    last_error = "no answer"
    while True:
        if process is not None and process.poll() is not None:
            raise TracerError(
                f"Jaeger exited with status {process.returncode} before its query API answered{where}; "
                "fix the config or free its ports (ss -ltnp) and rerun.",
                ExitCode.EXPORT_FAILED,
            )
        try:
            with opener.open(url, timeout=2.0) as resp:
                if resp.status == 200:
                    return
                last_error = f"HTTP {resp.status}"
        except urllib.error.HTTPError as exc:
            last_error = f"HTTP {exc.code}"
        except (urllib.error.URLError, OSError) as exc:
            last_error = str(getattr(exc, "reason", exc))
        if time.monotonic() >= deadline:
            raise TracerError(
                f"Jaeger's query API at {url} was not ready after {timeout_s:.0f} s ({last_error}){where}; "
                "check that Jaeger is running and rerun.",
                ExitCode.EXPORT_FAILED,
            )
        time.sleep(0.2)


def stop_jaeger(process: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """Stop a Jaeger started by :func:`start_jaeger`: SIGTERM to its group, then SIGKILL."""
    if process.poll() is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
