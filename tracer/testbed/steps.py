"""Running the testbed's long steps (Go builds take minutes) with progress and a log file."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from ollama_tracer.errors import ExitCode, TracerError

Progress = Callable[[str], None]


def cache_dir() -> Path:
    """Builds and downloads live here, outside any repository, so a second run is instant."""
    base = os.environ.get("TRACER_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "ollama-tracer"
    )
    path = Path(base)
    path.mkdir(parents=True, exist_ok=True)
    return path


def stderr_progress(message: str) -> None:
    print(f"tracer: {message}", file=sys.stderr, flush=True)


def require_tool(name: str, fix: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise TracerError(f"`{name}` is not installed; {fix}.", ExitCode.MISSING_DEPENDENCY)
    return path


def run_step(
    step: str,
    cmd: Sequence[str],
    *,
    log_path: Path,
    progress: Progress,
    fix: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    every_s: float = 15.0,
) -> None:
    """Run ``cmd`` to completion, appending its output to ``log_path``.

    A line of progress goes out every ``every_s`` seconds; a failure names the step, the log
    and the fix in one sentence.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    progress(f"{step} (log: {log_path})")
    with log_path.open("ab") as log:
        log.write(f"\n$ {' '.join(cmd)}\n".encode())
        log.flush()
        try:
            proc = subprocess.Popen(
                list(cmd), cwd=cwd, env=dict(env) if env is not None else None, stdout=log, stderr=log
            )
        except OSError as err:
            raise TracerError(f"{step} failed to start ({err}); {fix}.", ExitCode.BUILD_FAILED) from err
        next_report = started + every_s
        try:
            while proc.poll() is None:
                time.sleep(0.5)
                if time.monotonic() >= next_report:
                    progress(f"{step}: {time.monotonic() - started:.0f} s")
                    next_report += every_s
        except KeyboardInterrupt:
            proc.terminate()
            proc.wait()
            raise
    if proc.returncode != 0:
        tail = _tail(log_path)
        raise TracerError(
            f"{step} failed (exit {proc.returncode}, last output: {tail!r}); see {log_path}; {fix}.",
            ExitCode.BUILD_FAILED,
        )
    progress(f"{step}: done in {time.monotonic() - started:.0f} s")


def _tail(path: Path, limit: int = 300) -> str:
    data = path.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
    return " | ".join(data[-3:])[-limit:]
