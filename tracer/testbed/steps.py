"""Running the testbed's long steps (Go builds take minutes) with progress and a log file."""

from __future__ import annotations

import os
import re
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
    ninja_progress: bool = False,
) -> None:
    """Run ``cmd`` to completion, appending its output to ``log_path``.

    A line of progress goes out every ``every_s`` seconds (with ``ninja_progress``, it also
    carries the newest ``[N/M]`` or ``[ NN%]`` the build printed to the log); a failure names the step, the log
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
                    counter = ninja_counter(log_path) if ninja_progress else None
                    suffix = f", at {counter}" if counter else ""
                    progress(f"{step}: {time.monotonic() - started:.0f} s{suffix}")
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


# ninja prints "[N/M]"; the nested llama-server build (a Makefile project) prints "[ NN%]".
_BUILD_COUNTER = re.compile(rb"\[(\d+)/(\d+)\]|\[\s*(\d+)%\]")


def ninja_counter(path: Path, window: int = 16384) -> str | None:
    """The newest build progress counter in the tail of a log: ``"[212/367]"`` or ``"[ 42%]"``."""
    try:
        with path.open("rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - window))
            tail = handle.read()
    except OSError:
        return None
    matches = list(_BUILD_COUNTER.finditer(tail))
    if not matches:
        return None
    last = matches[-1]
    if last.group(3) is not None:
        return f"[{int(last.group(3)):3d}%]"
    return f"[{last.group(1).decode()}/{last.group(2).decode()}]"


def _tail(path: Path, limit: int = 300) -> str:
    data = path.read_bytes()[-4096:].decode(errors="replace").strip().splitlines()
    return " | ".join(data[-3:])[-limit:]
