"""Python stacks over time: py-spy samples the captured command (and its Python children).

py-spy runs beside the command (``record --nonblocking --subprocesses --idle --nolineno --format
chrometrace``) and writes ``raw/pyspy.chrometrace.json`` when it exits. Its ``ts`` have no epoch anchor, so the
capture makes its own: the command's Python process runs the clock-marker thread
(``ollama_tracer.instrument.clock_marker``), and ``collectors.pyspy_clock`` fits py-spy's offset
to the markers it logged (or falls back on the time py-spy was launched). ``collectors.pyspy_trace``
reads the trace and the markers back.

:func:`load_stacks` turns the trace back into :class:`StackSlice` rows in epoch ns. It reads only
the capture directory and survives any file content: a bad file becomes an error in the meta,
never an exception.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files, system
from ollama_tracer.capture_files import open_private, write_json
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.pyspy_clock import Alignment, align
from ollama_tracer.collectors.pyspy_trace import (
    ChromeTraceError,
    StackSlice,
    as_int,
    build_slices,
    parse_chrometrace,
    parse_markers,
)
from ollama_tracer.collectors.pyspy_trace import SliceBuild as SliceBuild  # re-exported: build_slices' result
from ollama_tracer.doctor_checks import check_pyspy
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.instrument.clock_marker import ENV_PYSPY_MARKER
from ollama_tracer.instrument.clock_marker import MARKER_FRAMES as MARKER_FRAMES  # re-exported: left out of stacks
from ollama_tracer.process_discovery import children_of, process_alive, process_state

META_SCHEMA = "tracer.pyspy/1"
RAW_TRACE = capture_files.PYSPY_TRACE
RAW_STDERR = capture_files.PYSPY_STDERR  # py-spy's stdout and stderr: its summary line is on stdout
RAW_META = capture_files.PYSPY_META
RAW_MARKERS = capture_files.MARKERS  # written by the command's auto-instrumentation (the capture creates it)

PTRACE_FIX = ("run tracer as root, grant py-spy CAP_SYS_PTRACE (`sudo setcap cap_sys_ptrace+ep "
              "$(readlink -f $(which py-spy))`), or `sudo sysctl kernel.yama.ptrace_scope=1`")
NATURAL_EXIT_S = 2.0  # py-spy stops by itself when its target exits; give it this long to write the file
SIGINT_WAIT_S = 10.0
# With --nonblocking py-spy never stops the command; its default mode ptrace-stops it for each
# sample. Should a py-spy hold the command stopped at every look for this long anyway, it is
# stuck: it is killed, which lets the kernel resume the command.
STALL_S = 5.0
STALL_POLL_S = 0.25
CHILDREN_EVERY = 8  # looks: the command's children are listed again every 2 s
RETRY_S = 0.5

_SUMMARY = re.compile(r"Samples: (\d+) Errors: (\d+)")
_LAGGING = re.compile(r"behind in sampling")
_PERMISSION = re.compile(r"permission denied|operation not permitted|os error 1\b|EPERM", re.IGNORECASE)
_NO_PYTHON = "No python processes found"


# --- reading --------------------------------------------------------------------------------


def _read_meta(path: Path) -> dict[str, Any]:
    try:
        payload = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError, RecursionError):
        return {"meta_error": f"{path.name} is not valid JSON"}
    return payload if isinstance(payload, dict) else {"meta_error": f"{path.name} is not a JSON object"}


@dataclass
class PythonStacks:
    """py-spy's stack slices of the client processes, in epoch ns, and the collector's meta (alignment)."""

    slices: list[StackSlice]
    meta: dict[str, Any]
    unreadable: dict[str, int] = field(default_factory=dict)

    @property
    def rate_hz(self) -> float:
        return float(self.meta.get("rate_hz", 100))


def load(directory: Path, clock: ClockModel | None) -> PythonStacks | None:
    """py-spy's clock is aligned by its own markers (``meta["alignment"]``): ``clock`` is not needed."""
    if not (directory / RAW_META).exists():
        return None
    slices, meta, bad = load_stacks(directory)
    return PythonStacks(slices, meta, {RAW_TRACE: bad})


def load_stacks(directory: Path) -> tuple[list[StackSlice], dict[str, Any], int]:
    """The capture's py-spy stacks in epoch ns, the py-spy meta (with ``alignment``), and the number
    of events that could not be used (malformed or unbalanced).

    Never raises on file content: a missing or unreadable trace gives no slices and says why in
    ``meta["error"]``. The alignment stored at capture time is used; a capture killed before py-spy's
    collector stopped has none, so it is recomputed here from the trace and the markers.
    """
    meta = _read_meta(directory / RAW_META)
    # What attribution reads from the meta is well-formed or left out (and said so), whatever happens below.
    if meta.get("alignment") is not None and Alignment.from_json(meta["alignment"]) is None:
        meta["alignment"] = None
        meta["meta_error"] = f"{RAW_META} has a malformed alignment, which was left out"
    rate = as_int(meta.get("rate_hz"))
    if "rate_hz" in meta and not (rate is not None and 0 < rate < 2**32):
        del meta["rate_hz"]
        meta["meta_error"] = f"{RAW_META} has a malformed rate_hz, which was left out"
    try:
        data = (directory / RAW_TRACE).read_bytes()
    except OSError:
        data = b""
    if not data.strip():
        if meta:
            meta["error"] = "py-spy wrote no stacks"
        return [], meta, 0
    try:
        events, malformed = parse_chrometrace(data)
    except ChromeTraceError as err:
        meta["error"] = str(err)
        return [], meta, 0
    alignment = Alignment.from_json(meta.get("alignment"))
    if alignment is None:
        launch = as_int(meta.get("launch_epoch_ns"))
        rate = as_int(meta.get("rate_hz"))
        if launch is None:
            meta["error"] = "the py-spy meta has no launch time, so its stacks cannot be placed in time"
            return [], meta, malformed
        try:
            markers_text = (directory / RAW_MARKERS).read_text(encoding="utf-8", errors="replace")
        except OSError:
            markers_text = ""
        markers, _ = parse_markers(markers_text)
        alignment = align(events, markers, rate_hz=rate if rate is not None and rate > 0 else 100,
                          launch_epoch_ns=launch)
        meta["alignment"] = alignment.to_json()
    build = build_slices(events, alignment.offset_ns)
    meta.update({
        "events": len(events),
        "malformed_events": malformed,
        "unbalanced_events": build.unbalanced,
        "implicitly_closed_frames": build.implicitly_closed,
        "unterminated_frames": build.unterminated,
        "marker_slices_excluded": build.marker_slices,
        "processes": {str(pid): cmdline for pid, cmdline in build.processes.items()},
    })
    return build.slices, meta, malformed + build.unbalanced


# --- collecting -----------------------------------------------------------------------------


def pyspy_binary() -> str | None:
    """The py-spy next to this interpreter (not a version-manager shim, whose start-up delays the anchor)."""
    beside = Path(sysconfig.get_path("scripts")) / "py-spy"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("py-spy")


def diagnose(output: str, pid: int) -> str:
    """One sentence (with the fix) for a py-spy run that ended without writing stacks."""
    if _PERMISSION.search(output):
        return f"py-spy may not read process {pid} (permission denied); {PTRACE_FIX}."
    if _NO_PYTHON in output:
        if not system.has_capability(system.CAP_SYS_PTRACE):
            return (f"py-spy found no Python process it may read in {pid} or its children; if the command is "
                    f"Python, {PTRACE_FIX}.")
        return f"py-spy found no Python process in {pid} or its children: the command ran no Python while sampled."
    lines = [line.strip() for line in output.splitlines() if line.strip() and not line.startswith(" ")]
    detail = next((line for line in lines if line.startswith("Error")), lines[-1] if lines else "no output")
    return f"py-spy stopped without writing stacks ({detail[:200]}); see {RAW_STDERR}."


class PySpyCollector:
    """Sample the command's Python stacks (or an existing process with ``attach_pid``) with py-spy."""

    name = "pyspy"

    def __init__(self, rate_hz: int = 100, *, attach_pid: int | None = None) -> None:
        self.rate_hz = rate_hz
        self.attach_pid = attach_pid
        self._session: SessionInfo | None = None
        self._binary: str | None = None
        self._target: int | None = None
        self._proc: subprocess.Popen[bytes] | None = None
        self._argv: list[str] = []
        self._launch_epoch_ns: int | None = None
        self._attempts = 0
        self._attempt_offset = 0  # where the current attempt's output starts in the stderr file
        self._errors: list[str] = []
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None
        self._guard: threading.Thread | None = None
        self._stalled = False  # the guard killed a py-spy that held the command stopped

    def available(self) -> tuple[bool, str]:
        self._binary = pyspy_binary()
        if self._binary is None:
            return False, "py-spy is not installed; `pip install py-spy`"
        check = check_pyspy()
        if check.status == "fail":
            return False, f"{check.detail}; {check.fix}."
        if not check.ok:
            return False, f"{check.detail}; {PTRACE_FIX}."
        if not system.has_capability(system.CAP_SYS_PTRACE) and system.ptrace_scope() == 1:
            # Yama scope 1 allows tracing descendants only, and py-spy is the command's sibling.
            return False, ("kernel.yama.ptrace_scope=1 lets py-spy trace only its own descendants, and the command "
                           "is not one; run tracer as root, grant py-spy CAP_SYS_PTRACE, or "
                           "`sudo sysctl kernel.yama.ptrace_scope=0`.")
        return True, ""

    def start(self, session: SessionInfo) -> None:
        self._session = session
        if self._binary is None:
            self._binary = pyspy_binary()
        if self._binary is None:
            raise TracerError("py-spy is not installed; `pip install py-spy`.", ExitCode.MISSING_DEPENDENCY)
        if self.attach_pid is None:
            session.child_env[ENV_PYSPY_MARKER] = "1"
        else:
            self._begin(self.attach_pid)

    def child_started(self, pid: int) -> None:
        if self.attach_pid is None and self._session is not None:
            self._begin(pid)

    def _begin(self, pid: int) -> None:
        self._target = pid
        with self._lock:
            self._launch()
        self._watcher = threading.Thread(target=self._watch, name="pyspy-watch", daemon=True)
        self._watcher.start()
        self._guard = threading.Thread(target=self._guard_against_stall, name="pyspy-stall-guard", daemon=True)
        self._guard.start()

    def _guard_against_stall(self) -> None:
        """Never let py-spy hold the command: stopped by its tracer (state ``t``) at every look for
        :data:`STALL_S`, py-spy is killed (its stacks are lost) and the command carries on."""
        stopped_since: float | None = None
        children: list[int] = []
        looks = 0
        while not self._stopping.wait(STALL_POLL_S):
            proc, target = self._proc, self._target
            if proc is None or target is None:
                return
            if proc.poll() is not None:
                stopped_since = None
                continue  # between attempts, or done: _watch decides
            if looks % CHILDREN_EVERY == 0:  # py-spy samples the command's children too; a /proc scan is ~5 ms
                children = children_of(target)
            looks += 1
            if not any(process_state(pid) == "t" for pid in (target, *children)):  # t: tracing stop
                stopped_since = None
                continue
            now = time.monotonic()
            stopped_since = stopped_since if stopped_since is not None else now
            if now - stopped_since >= STALL_S:
                with self._lock:
                    self._stalled = True
                    self._stopping.set()  # no relaunch
                    with contextlib.suppress(ProcessLookupError):
                        proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=5)
                return

    def _launch(self) -> None:
        """Start (or restart) py-spy on the target; the caller holds the lock."""
        assert self._session is not None and self._binary is not None and self._target is not None
        raw = self._session.raw_dir
        trace = self._session.directory / RAW_TRACE
        with open_private(trace, "wb"):
            pass  # py-spy truncates the file and keeps its mode: the trace is 0600 from the start
        # --nonblocking: py-spy reads the command's memory without stopping it. In its default mode it
        # ptrace-stops every thread for each sample, and beside a busy runner on 2 cores that held
        # the command stopped for seconds (py-spy issues #565, #872): the observer changed what it
        # observed. A sample read while the stack changes may be torn; py-spy counts it as an error.
        self._argv = [self._binary, "record", "--nonblocking", "--subprocesses", "--idle", "--nolineno", "--format",
                      "chrometrace", "-r", str(self.rate_hz), "-o", str(trace), "--pid", str(self._target)]
        stderr_path = raw / Path(RAW_STDERR).name
        with open_private(stderr_path, "ab") as out:
            self._attempt_offset = out.tell()
            self._launch_epoch_ns = time.time_ns()
            try:
                # Its own session: the terminal's Ctrl-C goes to the command; py-spy stops when we say.
                self._proc = subprocess.Popen(self._argv, stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                              start_new_session=True)
            except OSError as err:
                raise TracerError(f"could not start py-spy ({err.strerror}); reinstall it with `pip install py-spy`.",
                                  ExitCode.MISSING_DEPENDENCY) from err
        self._attempts += 1
        self._write_meta(None)

    def _attempt_output(self) -> str:
        assert self._session is not None
        path = self._session.directory / RAW_STDERR
        try:
            with open(path, "rb") as out:
                out.seek(self._attempt_offset)
                return out.read(65_536).decode("utf-8", errors="replace")
        except OSError:
            return ""

    def _watch(self) -> None:
        """Relaunch py-spy while the command has not started Python yet (a shell script, say).

        py-spy gives up after about a second without a Python process; the command may start one
        later. Only the first failed attempt's output is kept, so the stderr file stays small.
        """
        while True:
            proc = self._proc
            if proc is None:
                return
            proc.wait()
            output = self._attempt_output()
            target = self._target
            if (self._stopping.is_set() or _NO_PYTHON not in output or target is None or not process_alive(target)
                    or self._trace_written()):
                return
            if self._attempts > 1:
                self._truncate_output()
            if self._stopping.wait(RETRY_S):
                return
            with self._lock:
                if self._stopping.is_set():
                    return
                try:
                    self._launch()
                except TracerError as err:
                    self._errors.append(err.message)
                    return

    def _truncate_output(self) -> None:
        assert self._session is not None
        with contextlib.suppress(OSError):
            os.truncate(self._session.directory / RAW_STDERR, self._attempt_offset)

    def _trace_written(self) -> bool:
        assert self._session is not None
        try:
            return (self._session.directory / RAW_TRACE).stat().st_size > 0
        except OSError:
            return False

    def stop(self) -> dict[str, Any]:
        self._stopping.set()
        with self._lock:
            proc = self._proc
        stats: dict[str, Any] = {"mode": "attach" if self.attach_pid is not None else "child",
                                 "target_pid": self._target, "rate_hz": self.rate_hz, "attempts": self._attempts}
        if proc is None or self._session is None:
            stats["errors"] = [*self._errors, "py-spy did not run: no command was started and no pid to attach to"]
            return stats
        stopped_by = "stall" if self._stalled else self._finish(proc)
        for thread in (self._watcher, self._guard):
            if thread is not None:
                thread.join(timeout=5)
        output = self._attempt_output()
        summary = _SUMMARY.search(output)
        written = self._trace_written()
        # Lost: py-spy had sampled (or may have) but wrote nothing. A command that never ran Python lost nothing.
        lost = stopped_by in ("sigkill", "stall") or (not written and _NO_PYTHON not in output)
        if stopped_by == "stall":
            self._errors.append(f"py-spy held the command stopped for {STALL_S:.0f} s and was killed, so the command "
                                "could carry on: its stacks are lost (it writes them only on exit)")
        elif stopped_by == "sigkill":
            self._errors.append(f"py-spy did not exit {SIGINT_WAIT_S:.0f} s after SIGINT and was killed: "
                                "its stacks are lost (it writes them only on exit)")
        elif not written:
            self._errors.append(diagnose(output, self._target or 0))
        stats.update({
            "stopped_by": stopped_by,
            "exit_code": proc.returncode,
            "stacks_lost": lost,
            "samples": int(summary.group(1)) if summary else None,
            "dropped": int(summary.group(2)) if summary else 0,  # samples py-spy failed to read
            "lag_warnings": len(_LAGGING.findall(output)),
        })
        alignment = None
        if written and not lost:
            with contextlib.suppress(OSError):
                os.chmod(self._session.directory / RAW_TRACE, 0o600)
            slices, meta, bad = self._align_and_count()
            alignment = Alignment.from_json(meta.get("alignment"))
            stats.update({"events": meta.get("events", 0), "slices": len(slices), "malformed_events": bad})
            if "error" in meta:
                self._errors.append(str(meta["error"]))
        stats["alignment"] = alignment.to_json() if alignment is not None else None
        stats["errors"] = list(self._errors)
        self._write_meta(alignment, stats)
        return stats

    def _finish(self, proc: subprocess.Popen[bytes]) -> str:
        """Let py-spy write its file: by itself if the target is gone, else on SIGINT; kill as the last resort."""
        target_gone = self._target is None or not process_alive(self._target)
        if target_gone:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=NATURAL_EXIT_S)
                return "exit"
        if proc.poll() is not None:
            return "exit"
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=SIGINT_WAIT_S)
            return "sigint"
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            return "sigkill"

    def _align_and_count(self) -> tuple[list[StackSlice], dict[str, Any], int]:
        """Compute the alignment once, at the end, and store it with the meta for attribution."""
        assert self._session is not None
        self._write_meta(None)  # no stored alignment: load_stacks computes it from trace + markers
        return load_stacks(self._session.directory)

    def _write_meta(self, alignment: Alignment | None, stats: dict[str, Any] | None = None) -> None:
        assert self._session is not None
        meta: dict[str, Any] = {
            "schema": META_SCHEMA,
            "mode": "attach" if self.attach_pid is not None else "child",
            "target_pid": self._target,
            "rate_hz": self.rate_hz,
            "argv": self._argv,
            "launch_epoch_ns": self._launch_epoch_ns,
            "attempts": self._attempts,
            "trace": RAW_TRACE,
            "alignment": alignment.to_json() if alignment is not None else None,
        }
        if stats is not None:
            meta.update({key: stats.get(key) for key in ("samples", "dropped", "stacks_lost", "stopped_by")})
            meta["errors"] = stats.get("errors", [])
        write_json(self._session.directory / RAW_META, meta)

