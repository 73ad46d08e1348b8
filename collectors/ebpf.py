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
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files, system
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors import ebpf_profile
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.go_offsets import GoOffsets, read_offsets
from ollama_tracer.collectors.probe_catalogue import DESIGN_NOTES, ProbeSpec, design_for, probes_for
from ollama_tracer.errors import ExitCode, TracerError

READY = "TRACER_EBPF_READY"
RAW_EVENTS = capture_files.EBPF_EVENTS
RAW_STDERR = capture_files.EBPF_STDERR
HARMLESS_STDERR = re.compile(r"couldn't set RLIMIT_MEMLOCK|Attaching \d+ probes?|WARNING: Addrspace mismatch|"
                             r"Could not determine instruction boundary|^\s*tracepoint:|^\s*~+\s*$")

_SYSCALLS = r'''
tracepoint:syscalls:sys_enter_accept4 /{F}/ { @apeer[tid] = (uint64)args->upeer_sockaddr; }
tracepoint:syscalls:sys_exit_accept4 /{F} && args->ret >= 0/ {
  // The peer's port (big-endian, offset 2 of sockaddr_in/in6): the client's side of the 4-tuple.
  @sock[pid, args->ret] = 1; printf("A %llu %d %d %d %r\n", nsecs, pid, tid, args->ret, buf(@apeer[tid] + 2, 2));
  delete(@apeer[tid]); }
tracepoint:syscalls:sys_enter_connect /{F}/ { @cfd[tid] = args->fd; @cpend[tid] = 1; }
tracepoint:syscalls:sys_exit_connect /{F} && @cpend[tid] == 1/ {
  @sock[pid, @cfd[tid]] = 2; printf("C %llu %d %d %d %d\n", nsecs, pid, tid, @cfd[tid], args->ret);
  delete(@cfd[tid]); delete(@cpend[tid]); }
tracepoint:syscalls:sys_enter_read /{F} && @sock[pid, args->fd]/ {
  @rfd[tid] = args->fd; @rbuf[tid] = args->buf; @rpend[tid] = 1; }
tracepoint:syscalls:sys_exit_read /@rpend[tid] == 1/ {
  // Only the start of an HTTP message (or EOF) is a boundary; chunk continuations are not printed.
  $head = str(@rbuf[tid], 4);
  // EOF (0) or an error other than EAGAIN (-11) is the peer going away: a client closing with
  // unread response bytes makes its kernel send RST, so the server then reads -ECONNRESET.
  if (args->ret == 0 || (args->ret < 0 && args->ret != -11) ||
      (args->ret > 0 && ($head == "POST" || $head == "GET " || $head == "HTTP"))) {
    printf("R %llu %d %d %d %d %r\n", nsecs, pid, tid, @rfd[tid], args->ret, buf(@rbuf[tid], 18));
  }
  delete(@rfd[tid]); delete(@rbuf[tid]); delete(@rpend[tid]); }
tracepoint:syscalls:sys_enter_write /{F} && @sock[pid, args->fd]/ {
  $head = str(args->buf, 4);
  // ... and the chunked-encoding terminator: the response completed (an EOF after it is not an interrupt).
  if ($head == "POST" || $head == "GET " || $head == "HTTP" || $head == "0\r\n\r") {
    printf("W %llu %d %d %d %d %r\n", nsecs, pid, tid, args->fd, args->count, buf(args->buf, 18));
  } }
tracepoint:syscalls:sys_enter_getsockname /{F}/ { @gsa[tid] = (uint64)args->usockaddr; @gsfd[tid] = args->fd; }
tracepoint:syscalls:sys_exit_getsockname /@gsa[tid] != 0/ {
  // Go reads its local address right after connect: the server's port of the hop to a runner.
  if (args->ret == 0) { printf("N %llu %d %d %d %r\n", nsecs, pid, tid, @gsfd[tid], buf(@gsa[tid] + 2, 2)); }
  delete(@gsa[tid]); delete(@gsfd[tid]); }
tracepoint:syscalls:sys_enter_openat /{F}/ { @opath[tid] = args->filename; @opend[tid] = 1; }
tracepoint:syscalls:sys_exit_openat /@opend[tid] == 1/ {
  if (args->ret >= 0) { @file[pid, args->ret] = 1; }
  printf("O %llu %d %d %d %s\n", nsecs, pid, tid, args->ret, str(@opath[tid]));
  delete(@opath[tid]); delete(@opend[tid]); }
tracepoint:syscalls:sys_enter_close /{F} && (@sock[pid, args->fd] || @file[pid, args->fd])/ {
  printf("X %llu %d %d %d 0\n", nsecs, pid, tid, args->fd);
  delete(@sock[pid, args->fd]); delete(@file[pid, args->fd]); }
'''


def comm_of(binary: Path) -> str:
    return binary.name[:15]  # the kernel's TASK_COMM_LEN - 1


@dataclass
class ProbePlan:
    """The catalogue checked against one binary: what attaches where, and what is missing."""

    binary: Path
    version: str | None
    design: str
    attached: dict[str, tuple[ProbeSpec, int]] = field(default_factory=dict)  # symbol -> (spec, address)
    missing: list[str] = field(default_factory=list)
    symbol_source: str = "none"
    goroutines: GoOffsets | None = None  # the goroutine layer, when the binary's DWARF gives the offsets
    goroutine_probes: dict[str, int] = field(default_factory=dict)  # "serve"/"round_trip" -> address
    goroutine_note: str = "off: the symbol layer is off"

    def to_json(self) -> dict[str, Any]:
        return {
            "binary": str(self.binary), "version": self.version, "design": self.design,
            "symbol_source": self.symbol_source,
            "attached": {sym: {"key": spec.key, "address": hex(addr), "process": spec.process}
                         for sym, (spec, addr) in self.attached.items()},
            "missing": self.missing,
            "goroutines": {"on": self.goroutines is not None, "note": self.goroutine_note,
                           **({"offsets": asdict(self.goroutines)} if self.goroutines else {})},
        }


def plan_probes(binary: Path, version: str | None, layers: str = "all") -> ProbePlan:
    plan = ProbePlan(binary=binary, version=version, design=design_for(version))
    specs = probes_for(version) if layers == "all" else ()
    if not specs:
        return plan
    from ollama_tracer.collectors.symbols import SymbolTable

    table = SymbolTable.load(binary)
    plan.symbol_source = "gopclntab" if table.stripped else "symtab"
    found, missing = table.resolve_many(spec.symbol for spec in specs)
    for spec in specs:
        if spec.symbol in found:
            address = found[spec.symbol].address
            # bpftrace 0.17 maps a virtual address to a file offset through the ELF symbols; in a
            # stripped binary it takes the number as the file offset itself.
            plan.attached[spec.symbol] = (spec, table.file_offset(address) if table.stripped else address)
    plan.missing = sorted(set(missing))
    _plan_goroutines(plan, table)
    return plan


GOROUTINE_SYMBOLS = {"serve": "net/http.(*conn).serve", "round_trip": "net/http.(*persistConn).roundTrip"}


def _plan_goroutines(plan: ProbePlan, table: Any) -> None:
    if not plan.attached:
        plan.goroutine_note = "off: no catalogue probe attached"
        return
    found, missing = table.resolve_many(GOROUTINE_SYMBOLS.values())
    if missing:
        plan.goroutine_note = f"off: {', '.join(sorted(missing))} not in the binary"
        return
    offsets, reason = read_offsets(plan.binary)
    if offsets is None:
        plan.goroutine_note = f"off: {reason}"
        return
    plan.goroutines = offsets
    plan.goroutine_probes = {key: found[symbol].address for key, symbol in GOROUTINE_SYMBOLS.items()}
    plan.goroutine_note = "on: requests that overlap in the server are matched by goroutine and connection"


@dataclass(frozen=True)
class HeldSocket:
    """A socket an Ollama process held when the capture started, with its TCP ports if any."""

    pid: int
    fd: int
    local_port: int = 0
    remote_port: int = 0


def existing_sockets(comm: str) -> list[HeldSocket]:
    """Sockets the Ollama processes already hold: keep-alive connections opened before the capture
    are otherwise invisible to the fd-tracking probes, and their ports are the 4-tuples that tie a
    server's runner connection to the runner's end of it."""
    from ollama_tracer.netstat import socket_fds, tcp_rows

    held: list[tuple[int, int, str]] = []
    for proc in Path("/proc").iterdir():
        try:
            if not proc.name.isdigit() or (proc / "comm").read_text().strip() != comm:
                continue
        except OSError:
            continue  # exited meanwhile
        held += [(int(proc.name), fd, inode) for fd, inode in socket_fds(proc.name).items()]
    ports = {row.inode: (row.local_port, row.remote_port) for row in tcp_rows()} if held else {}
    return [HeldSocket(pid, fd, *ports.get(inode, (0, 0))) for pid, fd, inode in held]


def build_script(plan: ProbePlan, profile_hz: int = 0, held: list[HeldSocket] | None = None) -> str:
    comm = comm_of(plan.binary)
    filt = f'comm == "{comm}"'
    primed = " ".join(f"@sock[{h.pid}, {h.fd}] = 3;" for h in (existing_sockets(comm) if held is None else held))
    lines = [f'BEGIN {{ {primed} printf("{READY}\\n"); }}', _SYSCALLS.replace("{F}", filt)]
    if profile_hz > 0:
        lines.append(ebpf_profile.probe(profile_hz, filt))
    go = plan.goroutines
    # With the goroutine layer every uprobe also says which goroutine it ran on, and which started it.
    ids = (f' %llu %llu\\n", nsecs, pid, tid, *(uint64*)(reg("r14") + {go.g_goid}), '
           f'*(uint64*)(reg("r14") + {go.g_parent_goid})') if go else '\\n", nsecs, pid, tid'
    for index, (_symbol, (_spec, address)) in enumerate(sorted(plan.attached.items(), key=lambda i: i[1][1])):
        lines.append(f'uprobe:{plan.binary}:{address:#x} {{ printf("U %llu %d %d {index}{ids}); }}')
    if go:
        goid = f'*(uint64*)(reg("r14") + {go.g_goid})'
        serve_fd = go.fd_of_conn_iface(f'reg("ax") + {go.http_conn_rwc}')
        trip_fd = go.fd_of_conn_iface(f'reg("ax") + {go.persist_conn_conn}')
        for kind, key, fd in (("G", "serve", serve_fd), ("T", "round_trip", trip_fd)):
            lines.append(f'uprobe:{plan.binary}:{plan.goroutine_probes[key]:#x} '
                         f'{{ printf("{kind} %llu %d %d %lld %llu\\n", nsecs, pid, tid, {fd}, {goid}); }}')
    lines.append("END { clear(@apeer); clear(@sock); clear(@file); clear(@cfd); clear(@cpend); clear(@rfd); "
                 "clear(@rbuf); clear(@opath); clear(@rpend); clear(@opend); clear(@gsa); clear(@gsfd); }")
    return "\n".join(lines) + "\n"


def probe_index(plan: ProbePlan) -> dict[int, str]:
    ordered = sorted(plan.attached.items(), key=lambda i: i[1][1])
    return {index: symbol for index, (symbol, _) in enumerate(ordered)}


def runner_models(pids: set[int]) -> set[str]:
    """The model blobs the runners were started with (``runner --model BLOB``)."""
    blobs = set()
    for pid in pids:
        try:
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "--model" in argv[:-1]:
            blobs.add(argv[argv.index("--model") + 1])
    return blobs


def find_ollama_binary(pid: int) -> Path:
    return Path(os.readlink(f"/proc/{pid}/exe"))


class EbpfCollector:
    """bpftrace on the Ollama server and its runners: syscall tracepoints plus catalogue uprobes."""

    name = "ebpf"

    def __init__(self, *, ollama_pid: int | None = None, layers: str = "all",
                 profile_hz: int = ebpf_profile.DEFAULT_HZ, ready_timeout_s: float = 30.0) -> None:
        self.ollama_pid = ollama_pid
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

    def available(self) -> tuple[bool, str]:
        """The same checks as `tracer doctor`, in the same words: what is missing, then the fix."""
        from ollama_tracer.doctor_checks import check_bpftrace, check_privileges, check_tracefs

        for check in (check_bpftrace, check_privileges, check_tracefs):
            result = check()
            if not result.ok:
                return False, f"{result.detail}; {result.fix}"
        return True, ""

    def start(self, session: SessionInfo) -> None:
        from ollama_tracer.process_discovery import ollama_server_pid, ollama_version_of

        pid = self.ollama_pid or session.ollama_pid or ollama_server_pid(session.ollama_host)
        if pid is None:
            raise TracerError(f"no Ollama server process found for {session.ollama_host}; pass --ollama-pid.",
                              ExitCode.OLLAMA_UNREACHABLE)
        binary = find_ollama_binary(pid)
        version = session.ollama_version or ollama_version_of(session.ollama_host)
        self._plan = plan_probes(binary, version, self.layers)
        self._directory = session.directory
        held = existing_sockets(comm_of(binary))
        script = build_script(self._plan, self.profile_hz, held)
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
            env={**os.environ, "BPFTRACE_NO_USER_SYMBOLS": "1"},
        )
        assert self._proc.stdin is not None and self._proc.stdout is not None
        self._proc.stdin.write(script)
        self._proc.stdin.close()
        ready = threading.Event()
        out_path = session.directory / RAW_EVENTS
        self._reader = threading.Thread(target=self._read, args=(self._proc, out_path, ready), daemon=True)
        self._reader.start()
        deadline = time.monotonic() + self.ready_timeout_s
        while not ready.wait(0.05):
            if self._proc.poll() is not None or time.monotonic() > deadline:
                message = self._stderr_summary(session.directory)
                self._kill()
                raise TracerError(f"bpftrace did not start ({message}).", ExitCode.PERMISSION)
        self._meta = {"pid": pid, "binary": str(binary), "plan": self._plan.to_json(),
                      "probe_index": probe_index(self._plan), "roles": {},
                      "sockets_at_start": [asdict(h) for h in held if h.local_port]}
        self._write_meta()

    def _write_meta(self) -> None:
        assert self._directory is not None
        capture_files.write_json(self._directory / capture_files.EBPF_META, self._meta)

    def _read(self, proc: subprocess.Popen[str], out_path: Path, ready: threading.Event) -> None:
        assert proc.stdout is not None
        out = capture_files.RawWriter(out_path)
        self._out = out
        try:
            for line in proc.stdout:  # read to the end even if the disk fills: bpftrace must not block
                if line.startswith(READY):
                    ready.set()
                    continue
                if line.startswith("Attaching ") and line.rstrip().endswith(("probes...", "probe...")):
                    continue  # bpftrace's own banner, on stdout: not an event
                out.write(line)
                if line.startswith("\t") or line == "\n":
                    continue  # a stack frame, or the end of a stack
                self._lines += 1
                fields = line.split(" ", 3)
                if len(fields) > 2 and fields[2].isdigit():
                    pid = int(fields[2])
                    if pid not in self._pids:
                        self._pids.add(pid)
                        # While it runs: a runner may be gone by the time the capture stops.
                        self._maps[pid] = ebpf_profile.read_maps(pid)
                    if line.startswith("P "):
                        self._samples += 1
        finally:
            out.close()

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
        if self._out is not None:
            stats.update(self._out.stats())
        if self._meta and self._directory is not None:
            from ollama_tracer.process_discovery import role_of

            # Roles now, while the runners still run: a runner's argv says "runner".
            server = int(self._meta["pid"])
            self._meta["roles"] = {str(pid): role_of(pid, server) for pid in sorted(self._pids)}
            self._meta["model_blobs"] = sorted(runner_models(self._pids))
            self._meta["profile_hz"] = self.profile_hz
            self._write_meta()
            if self.profile_hz and self._clock is not None:
                stats["profile_hz"] = self.profile_hz
                stats.update(ebpf_profile.symbolize_capture(
                    self._directory, self._clock, {pid: m for pid, m in self._maps.items() if m},
                    Path(self._meta["binary"])))
        if self._plan is not None:
            stats["probes_attached"] = len(self._plan.attached)
            stats["probes_missing"] = self._plan.missing
            stats["design"] = self._plan.design
            stats["design_note"] = DESIGN_NOTES[self._plan.design]
            stats["symbol_source"] = self._plan.symbol_source
        return stats


# ----------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class ProbeEvent:
    """One line of the eBPF collector's output, on the epoch clock."""

    # A accept, C connect, R read, W write, O openat, X close, U uprobe, N getsockname;
    # goroutine layer: G a goroutine serves connection fd, T a goroutine sends a request on fd
    kind: str
    time_ns: int
    pid: int
    tid: int
    fd: int = -1
    value: int = 0  # bytes (read ret / write count), connect ret; accept: the peer's port, N: the local port
    text: str = ""  # first bytes of the buffer, or the opened path, or the probe's symbol
    goid: int = 0  # the goroutine (U, G, T with the goroutine layer; 0: unknown)
    parent_goid: int = 0  # the goroutine that started it (U)


class ParseError(ValueError):
    pass


def parse_line(line: str, clock: ClockModel, probes: dict[int, str]) -> ProbeEvent:
    """Parse one output line; raises ParseError (a ValueError) on anything malformed."""
    parts = line.rstrip("\n").split(" ", 6)
    if len(parts) < 4 or len(parts[0]) != 1 or parts[0] not in "ACRWOXUGTN":
        raise ParseError(f"not an event line: {line[:80]!r}")
    kind = parts[0]
    try:
        boot_ns, pid, tid = int(parts[1]), int(parts[2]), int(parts[3])
        when = clock.to_epoch("boottime", boot_ns)
        if kind == "U":
            if len(parts) == 7:
                return ProbeEvent(kind, when, pid, tid, text=probes[int(parts[4])], goid=int(parts[5]),
                                  parent_goid=int(parts[6]))
            if len(parts) != 5:
                raise ParseError(f"malformed U event: {line[:80]!r}")
            return ProbeEvent(kind, when, pid, tid, text=probes[int(parts[4])])
        if kind in "GT":
            if len(parts) != 6:
                raise ParseError(f"malformed {kind} event: {line[:80]!r}")
            return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]), goid=int(parts[5]))
        if kind in "AN":
            rest = line.rstrip("\n").split(" ", 5)  # the port's bytes may print as a space
            return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]),
                              value=peer_port(rest[5]) if len(rest) > 5 else 0)
        if kind in "CX":
            return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]), value=int(parts[5]))
        if kind in "RW":
            return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]), value=int(parts[5]),
                              text=parts[6] if len(parts) > 6 else "")
        text = " ".join(parts[5:]) if len(parts) > 5 else ""
        return ProbeEvent(kind, when, pid, tid, fd=int(parts[4]), text=text)
    except (IndexError, KeyError, ValueError, OverflowError) as err:  # Overflow: a huge nsecs in the clock
        raise ParseError(f"malformed {kind} event: {line[:80]!r} ({err})") from None


def peer_port(printed: str) -> int:
    """bpftrace's ``%r`` of the 2 port bytes (``\\xc2\\x08``, printable bytes as themselves) → 49672."""
    # Only ``\xNN`` is an escape: a backslash byte prints as itself, which unicode_escape misreads.
    raw = bytes(int(escaped, 16) if escaped else ord(char)  # ValueError for a character past \xff
                for escaped, char in re.findall(r"\\x([0-9a-fA-F]{2})|(.)", printed, re.DOTALL))
    if len(raw) != 2:
        raise ValueError(f"not a 2-byte port: {printed!r}")
    return int.from_bytes(raw, "big")


def load_events(directory: Path, clock: ClockModel) -> tuple[list[ProbeEvent], dict[str, Any], int]:
    """(events in time order, the collector's meta, number of unparsable lines). A meta that is not what
    the collector wrote raises TracerError (BAD_CAPTURE): without it no event has a process or a probe."""
    meta_path = directory / capture_files.EBPF_META
    if not meta_path.exists():
        return [], {}, 0
    meta = capture_files.read_json(meta_path, "the eBPF collector's meta")
    problem = _meta_problem(meta)
    if problem is not None:
        raise TracerError(f"{meta_path} is corrupt (its {problem} is not what the eBPF collector writes); "
                          "re-run the capture.", ExitCode.BAD_CAPTURE)
    probes = {int(k): v for k, v in (meta.get("probe_index") or {}).items()}
    events: list[ProbeEvent] = []
    bad = 0
    path = directory / RAW_EVENTS
    if path.exists():
        with path.open(encoding="utf-8", errors="replace") as lines:
            for line in lines:
                if not line.strip() or line.startswith(("\t", "P ")):
                    continue  # stack samples: ebpf_profile.load_samples reads them
                try:
                    events.append(parse_line(line, clock, probes))
                except ParseError:
                    bad += 1
    events.sort(key=lambda e: e.time_ns)
    return events, meta, bad


Roles = Mapping[int, "str | None"]  # pid -> "server" / "runner" (None: neither, or not known)


@dataclass
class EbpfRecords:
    """The probe events of the server and its runners (time order), who each process was, the
    collector's meta, and the native stack samples when the profile probe ran."""

    events: list[ProbeEvent]
    meta: dict[str, Any]
    roles: dict[int, str | None]
    native_stacks: list[ebpf_profile.StackSample] = field(default_factory=list)
    unreadable: dict[str, int] = field(default_factory=dict)

    @property
    def profile_hz(self) -> int:
        return int(self.meta.get("profile_hz") or 0)


def load(directory: Path, clock: ClockModel | None) -> EbpfRecords | None:
    """bpftrace's records placed on the epoch clock; None for a capture without the collector."""
    if not (directory / capture_files.EBPF_META).exists():
        return None
    if clock is None:
        raise TracerError(f"{directory / capture_files.CAPTURE_JSON} has no clock, so the eBPF events cannot be "
                          "placed in time; re-run the capture.", ExitCode.BAD_CAPTURE)
    events, meta, bad = load_events(directory, clock)
    server_pid = int(meta["pid"])
    recorded = meta.get("roles") or {}
    from ollama_tracer.process_discovery import role_of

    roles = {pid: recorded.get(str(pid)) or role_of(pid, server_pid) for pid in {e.pid for e in events}}
    records = EbpfRecords(events, meta, roles, unreadable={capture_files.EBPF_EVENTS: bad})
    if meta.get("profile_hz"):
        records.native_stacks, bad_stacks = ebpf_profile.load_samples(directory, clock)
        records.unreadable[f"{capture_files.EBPF_EVENTS} (stacks)"] = bad_stacks
    return records


def _meta_problem(meta: dict[str, Any]) -> str | None:
    """The first field of the collector's meta that attribution reads and that does not have the shape
    the collector writes, if any."""

    def is_int(value: Any, bound: int = 2**63) -> bool:
        return type(value) is int and abs(value) < bound

    def is_int_text(key: str) -> bool:
        try:
            int(key)
        except ValueError:
            return False
        return True

    probe_index, roles, blobs = meta.get("probe_index") or {}, meta.get("roles") or {}, meta.get("model_blobs", [])
    plan, sockets = meta.get("plan") or {}, meta.get("sockets_at_start") or []
    goroutines = plan.get("goroutines", {}) if isinstance(plan, dict) else None
    fields = {
        "pid": is_int(meta.get("pid")),
        "probe_index": isinstance(probe_index, dict)
        and all(is_int_text(k) and isinstance(v, str) for k, v in probe_index.items()),
        "roles": isinstance(roles, dict) and all(v is None or isinstance(v, str) for v in roles.values()),
        "model_blobs": isinstance(blobs, list) and all(isinstance(b, str) for b in blobs),
        "profile_hz": meta.get("profile_hz") is None or (is_int(meta["profile_hz"], 2**32) and meta["profile_hz"] >= 0),
        "plan": isinstance(plan, dict) and isinstance(goroutines, dict) and isinstance(goroutines.get("note", ""), str)
        and isinstance(plan.get("version") or "", str),
        "sockets_at_start": isinstance(sockets, list) and all(
            isinstance(s, dict) and all(is_int(s.get(k)) for k in ("pid", "fd", "local_port", "remote_port"))
            for s in sockets),
    }
    return next((name for name, ok in fields.items() if not ok), None)
