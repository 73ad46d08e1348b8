"""eBPF evidence from inside the Ollama server and its runners, without changing them.

One bpftrace process carries two layers:

* **syscalls** (tracepoints; any binary, stripped release builds included): accept/read/write
  of the client connection, connect/write/read of the server↔runner HTTP hop, the runner's
  writes, and openat/close of files (the model blob: how many metadata scans per request, and
  how many bytes each read). Processes are selected by ``comm``, so runners that start after
  the capture began are covered.
* **symbols** (entry uprobes, attached by address): the functions of the probe catalogue that
  bound each phase. Addresses come from the ELF symbol table, or from Go's ``.gopclntab`` when
  the binary is stripped; each catalogue entry is checked against the binary at start-up and a
  missing one is reported, never fatal.
* **goroutines** (with the symbol layer, when the binary has DWARF: ``collectors.go_offsets``):
  each uprobe also prints its goroutine id and the id of the goroutine that started it, and
  ``net/http.(*conn).serve`` / ``(*persistConn).roundTrip`` print which connection (fd) a
  goroutine serves or sends on. With the syscall layer's ``getsockname`` ports (the TCP
  4-tuple of the server→runner hop), a request is followed from its client connection through
  the handler goroutine, the goroutine that calls the runner and the runner connection into the
  runner's handler: exact matching when requests overlap (``tracer.attribution.request_chain``).

``nsecs`` is CLOCK_BOOTTIME here; the parser converts to epoch ns with the capture's clock
model. The workload starts only after bpftrace printed its ready marker (probes live).

The probe plan and the program are ``collectors.ebpf_plan`` (with ``ebpf_program.bt``); the
records read back are ``collectors.ebpf_events``.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files, system
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors import ebpf_profile
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.ebpf_plan import (
    READY,
    ProbePlan,
    build_in_process_script,
    build_script,
    existing_sockets,
    plan_in_process,
    plan_probes,
    probe_index,
    process_names,
)
from ollama_tracer.collectors.probe_catalogue import DESIGN_NOTES
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.vocabulary import PROCESS_CLIENT, PROCESS_FORWARDER, PROCESS_OTHER, SOURCE_EBPF

PATH_BYTES = 200  # bpftrace v0.17's largest string: the file paths of openat events

RAW_STDERR = capture_files.EBPF_STDERR
HARMLESS_STDERR = re.compile(r"couldn't set RLIMIT_MEMLOCK|Attaching \d+ probes?|WARNING: Addrspace mismatch|"
                             r"Could not determine instruction boundary|^\s*tracepoint:|^\s*~+\s*$")


def runner_model(pid: int) -> str | None:
    """The model blob a runner was started with (``runner --model BLOB``, ``llama-server --model
    BLOB``); None for the server, a process that is gone, or one without ``--model``."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return None
    return argv[argv.index("--model") + 1] if "--model" in argv[:-1] else None


def runner_models(pids: set[int]) -> set[str]:
    """The model blobs the runners were started with."""
    return {blob for blob in map(runner_model, pids) if blob is not None}


def find_ollama_binary(pid: int) -> Path:
    """The server's executable as this process can open it. ``/proc/PID/exe`` names it as the
    server sees it; in a container (its own mount namespace and root) that path exists only
    inside, and ``/proc/PID/root`` + the path reaches it from here. Whichever is the same file
    (device and inode) as the one running is used; uprobes attach by inode, so both are equal."""
    from ollama_tracer.deployment import foreign_root

    running = os.stat(f"/proc/{pid}/exe")
    path = Path(os.readlink(f"/proc/{pid}/exe"))
    root = foreign_root(pid)
    for candidate in ([path, Path(root) / path.relative_to("/")] if root else [path]):
        try:
            found = candidate.stat()
        except OSError:
            continue
        if (found.st_dev, found.st_ino) == (running.st_dev, running.st_ino):
            return candidate
    raise TracerError(f"the Ollama server's binary ({path}, pid {pid}) cannot be opened from here, not even through "
                      f"/proc/{pid}/root; pass --ebpf-layers syscall.", ExitCode.PERMISSION)


class EbpfCollector:
    """bpftrace on the Ollama server and its runners: syscall tracepoints plus catalogue uprobes."""

    name = SOURCE_EBPF

    def __init__(self, *, ollama_pid: int | None = None, layers: str = "all",
                 profile_hz: int = ebpf_profile.DEFAULT_HZ, ready_timeout_s: float = 30.0,
                 in_process: Path | None = None) -> None:
        self.ollama_pid = ollama_pid
        # llama.cpp inside the command's own process (llama-cpp-python): this libllama.so is probed
        # in the command's processes, and no server is looked for.
        self.in_process = in_process
        self.layers = layers
        self.profile_hz = profile_hz  # 0: no stack sampling
        self._maps: dict[int, list[ebpf_profile.Mapping]] = {}
        self._samples = 0
        self._clock: ClockModel | None = None
        self.ready_timeout_s = ready_timeout_s
        self._proc: subprocess.Popen[str] | None = None
        self._reader: threading.Thread | None = None
        self._plan: ProbePlan | None = None
        self._lines = 0
        self._directory: Path | None = None
        self._out: Any = None  # the raw events file (a capture_files.RawWriter)
        self._meta: dict[str, Any] = {}
        self._pids: set[int] = set()
        self._parents: dict[int, int | None] = {}
        self._models: dict[int, str] = {}  # runner pid -> its model blob, read at first sight
        self._bpf_lost = 0  # events bpftrace said it lost ("Lost N events")
        self._forwarder: int | None = None  # the pid of the port forwarder in front of the server

    def available(self) -> tuple[bool, str]:
        """The same checks as `tracer doctor`, in the same words: what is missing, then the fix."""
        from ollama_tracer.doctor_checks import check_bpftrace, check_privileges, check_tracefs

        for check in (check_bpftrace, check_privileges, check_tracefs):
            result = check()
            if not result.ok:
                return False, f"{result.detail}; {result.fix}"
        return True, ""

    def start(self, session: SessionInfo) -> None:
        from ollama_tracer.deployment import follow
        from ollama_tracer.ollama_host import host_and_port
        from ollama_tracer.process_discovery import ollama_version_of

        if self.in_process is not None:
            self._start_in_process(session, self.in_process)
            return
        # A published container port: the server is behind a forwarder, whose hop is traced too.
        behind, forwarder = follow(host_and_port(session.ollama_host)[1]) if session.ollama_host else (None, None)
        pid = self.ollama_pid or session.ollama_pid or behind
        if forwarder is not None and forwarder.pid == pid:
            forwarder = None
        if pid is None:
            raise TracerError(f"no Ollama server process found for {session.ollama_host}; pass --ollama-pid, or "
                              "--in-process when the command runs llama.cpp itself (llama-cpp-python).",
                              ExitCode.OLLAMA_UNREACHABLE)
        binary = find_ollama_binary(pid)
        version = session.ollama_version or ollama_version_of(session.ollama_host)
        self._plan = plan_probes(binary, version, self.layers)
        self._directory = session.directory
        extra = [forwarder.name] if forwarder is not None and forwarder.name else []
        self._forwarder = forwarder.pid if forwarder is not None else None
        held = [h for comm in [*process_names(self._plan), *extra] for h in existing_sockets(comm)]
        script = build_script(self._plan, self.profile_hz, held, extra_comms=extra)
        self._launch(session, script)
        from ollama_tracer.process_discovery import children_of

        # A runner already running is older than its first event: it cannot have started inside
        # the capture (an idle runner of another model prints nothing until it is used).
        self._meta = {"pid": pid, "binary": str(binary), "plan": self._plan.to_json(),
                      "probe_index": probe_index(self._plan), "roles": {},
                      "sockets_at_start": [asdict(h) for h in held if h.local_port],
                      "children_at_start": children_of(pid),
                      "forwarder": asdict(forwarder) if forwarder is not None else None}
        self._write_meta()

    def _start_in_process(self, session: SessionInfo, library: Path) -> None:
        """The command's own processes (this process's descendants, followed in the kernel): the
        probes of its libllama and the stacks of the processes that call into it."""
        if not library.is_file():
            raise TracerError(f"{library} is not a file: pass the libllama.so that llama-cpp-python loads "
                              "(--in-process PATH, or $LLAMA_CPP_LIB_PATH).", ExitCode.USAGE)
        self._plan = plan_in_process(library, self.layers)
        self._directory = session.directory
        self._launch(session, build_in_process_script(self._plan, os.getpid(), self.profile_hz))
        self._meta = {"pid": os.getpid(), "binary": str(library), "plan": self._plan.to_json(),
                      "probe_index": probe_index(self._plan), "roles": {}, "in_process": True,
                      "sockets_at_start": [], "children_at_start": [], "forwarder": None}
        self._write_meta()

    def _launch(self, session: SessionInfo, script: str) -> None:
        """Start bpftrace on ``script``; returns once its probes are live."""
        assert self._plan is not None
        self._clock = session.clock
        capture_files.write_text(session.directory / capture_files.EBPF_SCRIPT, script)
        argv = [system.bpftrace_path() or "bpftrace", "-B", "line"]
        if self._plan.symbol_source == "gopclntab" and self._plan.attached:
            # bpftrace cannot check instruction boundaries without ELF symbols; the addresses are
            # function entries from Go's own table, which is exactly the check it would make.
            argv.append("--unsafe")
        self._proc = subprocess.Popen(
            [*argv, "-"], stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, stderr=capture_files.open_private(session.directory / RAW_STDERR),
            text=True, start_new_session=True,
            # Stacks are symbolized after the capture, off the observed machine's hot path.
            # A file path is 64 bytes by default: a models directory under a home directory then
            # loses the blob's digest (or "/blobs/" itself), and opens cannot be told apart.
            # A larger perf buffer (1 MiB per CPU, not 256 KiB) rides out the bursts of a cold load
            # and of the stack samples.
            env={**os.environ, "BPFTRACE_NO_USER_SYMBOLS": "1", "BPFTRACE_STRLEN": str(PATH_BYTES),
                 "BPFTRACE_PERF_RB_PAGES": "256"},
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(script)
        self._proc.stdin.close()
        ready = threading.Event()
        out_path = session.directory / capture_files.EBPF_EVENTS
        self._reader = threading.Thread(target=self._read, args=(self._proc, out_path, ready), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                message = self._stderr_summary(session.directory)
                self._kill()
                raise TracerError(f"bpftrace did not start ({message}).", ExitCode.PERMISSION)

    def _role(self, pid: int, server: int) -> str:
        from ollama_tracer.process_discovery import role_of

        if self.in_process is not None:
            return PROCESS_CLIENT  # only the command's own processes print anything
        parent = self._parents.get(pid)
        if self._forwarder is not None and self._forwarder in (pid, parent):  # socat forks one per connection
            return PROCESS_FORWARDER
        return role_of(pid, server, parent)

    def _write_meta(self) -> None:
        assert self._directory is not None
        capture_files.write_json(self._directory / capture_files.EBPF_META, self._meta)

    def _read(self, proc: subprocess.Popen[str], out_path: Path, ready: threading.Event) -> None:
        from ollama_tracer.process_discovery import parent_pid

        assert proc.stdout is not None
        out = capture_files.RawWriter(out_path)
        self._out = out
        stacks = ebpf_profile.MapReader()
        try:
            for line in proc.stdout:  # read to the end even if the disk fills: bpftrace must not block
                blocks = stacks.feed(line)
                if blocks is not None:  # the stack samples' maps, printed every flush and at the end
                    for block in blocks:
                        self._first_sight(int(block.split(" ", 3)[2]), parent_pid)
                        out.write(block)
                    self._samples += len(blocks)
                    continue
                if line.startswith(READY):
                    ready.set()
                    continue
                if line.startswith("Attaching ") and line.rstrip().endswith(("probes...", "probe...")):
                    continue  # bpftrace's own banner, on stdout: not an event
                if line.startswith("Lost ") and line.rstrip().endswith(" events"):
                    # bpftrace's buffer overflowed: this many events are gone, boundaries among them
                    self._bpf_lost += int(line.split()[1]) if line.split()[1].isdigit() else 0
                    continue
                out.write(line)
                if line.startswith("\t") or line == "\n":
                    continue  # a stack frame, or the end of a stack
                self._lines += 1
                fields = line.split(" ", 3)
                if len(fields) > 2 and fields[2].isdigit():
                    self._first_sight(int(fields[2]), parent_pid)
        finally:
            out.close()

    def _first_sight(self, pid: int, parent_pid: Callable[[int], int | None]) -> None:
        if pid in self._pids:
            return
        self._pids.add(pid)
        self._parents[pid] = parent_pid(pid)  # whose process it is: this server's, or another's
        # which model a runner serves, even once it has exited (in process, no runner: the
        # command's own --model is not a blob)
        model = runner_model(pid) if self.in_process is None else None
        if model is not None:
            self._models[pid] = model
        # While it runs: a runner may be gone by the time the capture stops.
        self._maps[pid] = ebpf_profile.read_maps(pid)

    def _drain(self, quiet_s: float = 0.15, bound_s: float = 1.5) -> None:
        """Wait until no event has arrived for ``quiet_s`` (at most ``bound_s``) before stopping:
        events still in bpftrace's per-CPU buffers when it is interrupted are lost (once seen: a
        whole last request of a node client, the last 0.3 s), and a client that exits the
        moment its last answer arrives (node, curl) would lose that request's last events."""
        deadline = time.monotonic() + bound_s
        seen, since = self._lines, time.monotonic()
        while time.monotonic() < deadline and time.monotonic() - since < quiet_s:
            time.sleep(0.03)
            if self._lines != seen:
                seen, since = self._lines, time.monotonic()

    def child_started(self, pid: int) -> None:
        pass

    def _stderr_summary(self, directory: Path) -> str:
        try:
            text = (directory / RAW_STDERR).read_text(errors="replace")
        except OSError:
            return "no output"
        useful = [line for line in text.splitlines() if line.strip() and not HARMLESS_STDERR.search(line)]
        return "; ".join(useful[-3:]) or "no output"

    def _kill(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            os.killpg(self._proc.pid, signal.SIGKILL)
            self._proc.wait()

    def stop(self) -> dict[str, Any]:
        stats: dict[str, Any] = {}
        if self._proc is not None:
            exited_early = self._proc.poll() is not None
            if not exited_early:
                self._drain()
                self._proc.send_signal(signal.SIGINT)
                try:
                    self._proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._kill()
            if self._reader is not None:
                self._reader.join(timeout=10)
            stats["bpftrace_exit"] = self._proc.returncode
            stats["exited_early"] = exited_early
            if exited_early and self._directory is not None:
                stats["error"] = self._stderr_summary(self._directory)
        stats["events"] = self._lines
        stats["bpftrace_lost_events"] = self._bpf_lost
        if self._out is not None:
            stats.update(self._out.stats())
        if self._meta and self._directory is not None:

            # Roles now, while the runners still run: a runner's argv says "runner". The comm filter
            # also records another Ollama server on this machine and its runners: "other".
            server = int(self._meta["pid"])
            roles = {pid: self._role(pid, server) for pid in sorted(self._pids)}
            self._meta["roles"] = {str(pid): role for pid, role in roles.items()}
            ours = {p for p, r in roles.items() if r != PROCESS_OTHER}
            self._meta["runner_models"] = {str(p): blob for p, blob in sorted(self._models.items()) if p in ours}
            self._meta["model_blobs"] = sorted(runner_models(ours) | set(self._meta["runner_models"].values()))
            self._meta["profile_hz"] = self.profile_hz
            self._meta["bpftrace_lost_events"] = self._bpf_lost
            self._write_meta()
            if self.profile_hz and self._clock is not None:
                stats["profile_hz"] = self.profile_hz
                stats.update(ebpf_profile.symbolize_capture(
                    self._directory, self._clock, {pid: m for pid, m in self._maps.items() if m},
                    Path(self._meta["binary"]) if self.in_process is None else None))
        if self._plan is not None:
            stats["probes_attached"] = len(self._plan.attached)
            stats["probes_missing"] = self._plan.missing
            stats["design"] = self._plan.design
            stats["design_note"] = DESIGN_NOTES[self._plan.design]
            stats["symbol_source"] = self._plan.symbol_source
        return stats
