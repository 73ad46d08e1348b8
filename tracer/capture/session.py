"""One capture session: collectors up, the command run, collectors flushed, everything written.

Whatever happens to the command (it fails, it is interrupted with Ctrl-C or SIGTERM), the
collectors are stopped and flushed and ``capture.json`` is written, so the directory is always
a valid, complete-so-far capture that ``tracer report`` can read.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any

from ollama_tracer import __version__, capture_files
from ollama_tracer.autoinstrument import child_env
from ollama_tracer.capture import directory as capture_directory
from ollama_tracer.clock import ClockModel, ClockTicker
from ollama_tracer.collectors.base import Collector, SessionInfo
from ollama_tracer.deployment import describe, is_llama_server
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.process_discovery import ollama_version_of, process_alive, server_settings
from ollama_tracer.vocabulary import ENV_GENAI_PROVIDER, PROVIDER_LLAMA_CPP

# Files a capture writes; --force removes exactly these, never anything else in the directory.
CAPTURE_FILES = capture_files.OUTPUTS
ENV_CAPTURE_DIR = "TRACER_CAPTURE_DIR"


@dataclass
class CaptureOptions:
    command: list[str]
    directory: Path
    force: bool = False
    ollama_host: str | None = None
    ollama_pid: int | None = None
    record_content: bool = False
    auto_instrument: bool = True
    grace_s: float = 10.0  # how long an interrupted command gets before SIGKILL
    mode: str = "capture"  # capture, proxy or attach


@dataclass
class CaptureResult:
    directory: Path
    exit_code: int
    interrupted: bool
    meta: dict[str, Any] = field(default_factory=dict)
    command_started: bool = True  # False: Ctrl-C came while the collectors started


def resolve_command(command: Sequence[str]) -> list[str]:
    """The command after ``--`` (argparse's REMAINDER keeps the separator), checked to exist."""
    if command and command[0] == "--":
        command = command[1:]
    if not command:
        raise TracerError("no command given; usage: tracer capture [options] -- CMD [ARGS...]", ExitCode.USAGE)
    program = command[0]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise TracerError(f"{program} does not exist or is not executable.", ExitCode.COMMAND_NOT_FOUND)
        return list(command)
    if shutil.which(program) is None:
        raise TracerError(f"command not found: {program!r} is not on PATH.", ExitCode.COMMAND_NOT_FOUND)
    return list(command)


def default_directory(command: Sequence[str]) -> Path:
    words = [Path(command[0]).name] + [w for w in command[1:3] if not w.startswith("-")]
    slug = "-".join("".join(c if c.isalnum() else "_" for c in w) for w in words)[:48]
    return Path(f"capture-{slug}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_directory(directory: Path, force: bool) -> None:
    if force and directory.is_dir():
        for name in CAPTURE_FILES:
            target = directory / name
            if target.is_dir():
                shutil.rmtree(target)
            else:
                target.unlink(missing_ok=True)
    capture_directory.create(directory, force=force)


class _Signals:
    """Forward SIGINT/SIGTERM to the command's process group; a second SIGINT kills it."""

    def __init__(self) -> None:
        self.received: list[int] = []
        self.child: subprocess.Popen[bytes] | None = None
        self.first_at: float | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> _Signals:
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(signum)
        if self.first_at is None:
            self.first_at = time.monotonic()
        if self.child is None or self.child.poll() is not None:
            return
        kill = signal.SIGKILL if self.received.count(signal.SIGINT) >= 2 else signum
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.child.pid, kill)


# Something other than a command to run while the collectors record (the proxy, attach's
# window): it gets the session and the signal state, and returns the exit code.
Workload = Callable[[SessionInfo, "_Signals"], int]


def run_capture(options: CaptureOptions, collectors: list[Collector], progress: Any = print,
                workload: Workload | None = None) -> CaptureResult:
    command = resolve_command(options.command) if workload is None else list(options.command)
    prepare_directory(options.directory, options.force)
    clock = ClockModel.measure()
    session = SessionInfo(directory=options.directory, clock=clock, ollama_host=options.ollama_host,
                          ollama_pid=options.ollama_pid, ollama_version=ollama_version_of(options.ollama_host))
    started_ns = time.time_ns()
    server = {"host": options.ollama_host, "pid": options.ollama_pid, "version": session.ollama_version,
              "settings": server_settings(options.ollama_pid),
              "deployment": describe(options.ollama_host, options.ollama_pid)}
    statuses: dict[str, dict[str, Any]] = {}
    running: list[Collector] = []
    errors: list[str] = []
    exit_code = int(ExitCode.FAILURE)
    interrupted = command_started = False
    # A provisional capture.json first: if the final one cannot be written (a full disk, a kill),
    # the raw files are still a capture that `tracer report` can read.
    capture_files.write_json(options.directory / capture_files.CAPTURE_JSON, {
        "schema": capture_directory.CAPTURE_SCHEMA, "tracer_version": __version__, "command": command,
        "complete": False,
        "started_ns": started_ns, "clock": clock.to_json(), "ollama": server, "collectors": {},
        "record_content": options.record_content, "mode": options.mode, "python": sys.version.split()[0]})
    with _Signals() as signals, ClockTicker() as ticker:
        try:
            for collector in collectors:
                ok, reason = collector.available()
                if not ok:
                    statuses[collector.name] = {"ran": False, "reason": reason}
                    progress(f"tracer: {collector.name} skipped: {reason}")
                    continue
                try:
                    collector.start(session)
                except TracerError as err:
                    statuses[collector.name] = {"ran": False, "reason": err.message}
                    progress(f"tracer: {collector.name} skipped: {err.message}")
                    continue
                except (OSError, ValueError) as err:  # a collector's own bug must not stop the capture
                    reason = f"it failed to start ({type(err).__name__}: {err})"
                    statuses[collector.name] = {"ran": False, "reason": reason}
                    progress(f"tracer: {collector.name} skipped: {reason}")
                    continue
                statuses[collector.name] = {"ran": True, "reason": ""}
                running.append(collector)
                if signals.received:
                    break  # Ctrl-C during start-up: do not start the command
            if not signals.received:
                command_started = True
                exit_code = (_run_command(command, options, session, running, signals) if workload is None
                             else workload(session, signals))
        finally:
            interrupted = bool(signals.received)
            for collector in running:
                try:
                    statuses[collector.name]["stats"] = collector.stop()
                except Exception as err:  # one collector's failure must not lose the others' data
                    statuses[collector.name]["error"] = f"{type(err).__name__}: {err}"
                    errors.append(f"{collector.name}: {err}")
            interrupted = bool(signals.received)  # Ctrl-C while the collectors stopped counts too
            clock = clock.finish(tuple(ticker.points))
            if options.ollama_pid and not process_alive(options.ollama_pid):
                errors.append(f"the Ollama server (pid {options.ollama_pid}) exited during the capture")
            full = [name for name, status in statuses.items() if (status.get("stats") or {}).get("disk_full")]
            errors += [f"{name}: {statuses[name]['stats']['write_error']}" for name in full]
            meta = {
                "schema": capture_directory.CAPTURE_SCHEMA,
                "tracer_version": __version__,
                "command": command,
                "complete": not full,
                "exit_code": exit_code,
                "interrupted": interrupted,
                "signals": [signal.Signals(s).name for s in signals.received],
                "started_ns": started_ns,
                "ended_ns": time.time_ns(),
                "clock": clock.to_json(),
                "collectors": statuses,
                "drops": _drops(statuses),
                "ollama": server,
                "record_content": options.record_content,
                "errors": errors,
                "mode": options.mode,
                "python": sys.version.split()[0],
            }
            try:
                capture_files.write_json(options.directory / capture_files.CAPTURE_JSON, meta)
            except TracerError as err:
                if err.exit_code != ExitCode.DISK_FULL:
                    raise
                full.append(capture_files.CAPTURE_JSON)  # the provisional one from the start stays
            if full:
                lost = sum(int((statuses.get(name) or {}).get("stats", {}).get("lost", 0)) for name in full)
                raise TracerError(f"the disk holding {options.directory} filled up during the capture ({lost} "
                                  f"records of {', '.join(full)} lost); what was written before is kept: free some "
                                  f"space, then run `tracer report {options.directory}`.", ExitCode.DISK_FULL)
    return CaptureResult(directory=options.directory, exit_code=exit_code, interrupted=interrupted, meta=meta,
                         command_started=command_started)


def _drops(statuses: dict[str, dict[str, Any]]) -> dict[str, int]:
    drops = {}
    for name, status in statuses.items():
        stats = status.get("stats") or {}
        count = sum(int(stats.get(key, 0) or 0) for key in ("dropped_spans", "rejected_spans", "dropped", "lost"))
        drops[name] = count
    return drops


def _run_command(command: list[str], options: CaptureOptions, session: SessionInfo, running: list[Collector],
                 signals: _Signals) -> int:
    base = dict(os.environ)
    base.update(session.child_env)
    base[ENV_CAPTURE_DIR] = str(options.directory.resolve())
    if options.ollama_host:
        base.setdefault("OLLAMA_HOST", options.ollama_host)
    if options.ollama_pid is not None and is_llama_server(options.ollama_pid):
        base.setdefault(ENV_GENAI_PROVIDER, PROVIDER_LLAMA_CPP)  # its /v1 calls are llama.cpp's, not Ollama's
    env = base
    if options.auto_instrument:
        markers = session.raw_dir / "markers.txt"
        os.close(os.open(markers, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
        env = child_env(base, endpoint=session.child_env.get("OTEL_EXPORTER_OTLP_ENDPOINT"),
                        protocol=session.child_env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc"),
                        record_content=options.record_content,
                        marker_file=str(markers), moments_as_attributes=True)
    try:
        child = subprocess.Popen(command, env=env, start_new_session=True)
    except OSError as err:
        raise TracerError(f"could not start {command[0]!r}: {err.strerror}.", ExitCode.COMMAND_NOT_FOUND) from err
    signals.child = child
    for collector in running:
        collector.child_started(child.pid)
    while True:
        try:
            returncode = child.wait(timeout=0.2)
            break
        except subprocess.TimeoutExpired:
            if signals.first_at is not None and time.monotonic() - signals.first_at > options.grace_s:
                os.killpg(child.pid, signal.SIGKILL)
    return returncode if returncode >= 0 else 128 - returncode

