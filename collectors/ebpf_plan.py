"""The eBPF collector's plan: which probes attach where in one Ollama binary, and the program that says so.

:func:`plan_probes` checks the probe catalogue (``collectors.probe_catalogue``) against the binary:
addresses come from the ELF symbol table, or from Go's ``.gopclntab`` when the binary is stripped;
a missing entry is reported, never fatal. The goroutine layer is planned when the binary's DWARF
gives the offsets (``collectors.go_offsets``). :func:`build_script` fills the bpftrace program
template, ``ebpf_program.bt``, with the capture's processes, sockets and probes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from ollama_tracer.collectors import ebpf_profile
from ollama_tracer.collectors.go_offsets import GoOffsets, read_offsets
from ollama_tracer.collectors.probe_catalogue import ProbeSpec, design_of, probes_for_design
from ollama_tracer.vocabulary import DESIGN_IN_PROCESS, DESIGN_LLAMA_SERVER, LLAMA_SERVER

READY = "TRACER_EBPF_READY"  # the program prints it once its probes are live
# The fixed part of the program. Placeholders: {F} the process filter, {PRIMED} the sockets held at
# start, {READY} the ready marker, {PROBES} the plan's probes (profile, uprobes), one per line.
PROGRAM = Path(__file__).with_name("ebpf_program.bt")
_PLACEHOLDER = re.compile(r"\{(F|PRIMED|READY|PROBES|CLEAR_SEEN|PROFILE_END)\}")




def comm_of(binary: Path) -> str:
    return binary.name[:15]  # the kernel's TASK_COMM_LEN - 1


def process_names(plan: ProbePlan) -> list[str]:
    """The ``comm`` of every Ollama process to trace: the server (and its Go runners, the same binary),
    and on the llama-server design its runner processes too."""
    return [comm_of(plan.binary), *([LLAMA_SERVER] if plan.design == DESIGN_LLAMA_SERVER else [])]


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
    library_dir: Path | None = None  # Ollama's lib/ollama (llama-server's shared libraries), when found
    targets: dict[str, str] = field(default_factory=dict)  # symbol -> uprobe target, for library functions

    def to_json(self) -> dict[str, Any]:
        return {
            "binary": str(self.binary), "version": self.version, "design": self.design,
            "symbol_source": self.symbol_source,
            "attached": {sym: {"key": spec.key, "address": hex(addr), "process": spec.process}
                         for sym, (spec, addr) in self.attached.items()},
            "missing": self.missing,
            "goroutines": {"on": self.goroutines is not None, "note": self.goroutine_note,
                           **({"offsets": asdict(self.goroutines)} if self.goroutines else {})},
            **({"library_dir": str(self.library_dir), "targets": self.targets} if self.library_dir else {}),
        }


def plan_probes(binary: Path, version: str | None, layers: str = "all") -> ProbePlan:
    design = design_of(binary.name, version)
    plan = ProbePlan(binary=binary, version=version, design=design)
    specs = probes_for_design(design, version) if layers == "all" else ()
    if not specs:
        return plan
    from ollama_tracer.collectors.symbols import SymbolTable

    table = SymbolTable.load(binary)
    plan.symbol_source = "gopclntab" if table.stripped else "symtab"
    in_binary = [spec for spec in specs if spec.library is None]
    found, missing = table.resolve_many(spec.symbol for spec in in_binary)
    for spec in in_binary:
        if spec.symbol in found:
            address = found[spec.symbol].address
            # bpftrace 0.17 maps a virtual address to a file offset through the ELF symbols; in a
            # stripped binary it takes the number as the file offset itself.
            plan.attached[spec.symbol] = (spec, table.file_offset(address) if table.stripped else address)
    missing += _plan_libraries(plan, [spec for spec in specs if spec.library is not None])
    plan.missing = sorted(set(missing))
    _plan_goroutines(plan, table)
    return plan


def plan_in_process(library: Path, layers: str = "all") -> ProbePlan:
    """llama.cpp inside the client's own process: the catalogue's ``IN_PROCESS`` probes, checked
    against ``library`` (the libllama.so that llama-cpp-python loads)."""
    plan = ProbePlan(binary=library, version=None, design=DESIGN_IN_PROCESS, library_dir=library.parent,
                     goroutine_note="off: no Go code in the process")
    specs = probes_for_design(DESIGN_IN_PROCESS, None) if layers == "all" else ()
    plan.symbol_source = "dynsym" if specs else "none"
    plan.missing = sorted(set(_plan_libraries(plan, [replace(spec, library=library.name) for spec in specs])))
    return plan


def build_in_process_script(plan: ProbePlan, ancestor: int, profile_hz: int = 0) -> str:
    """The bpftrace program of an in-process capture: the probes fire in ``ancestor``'s
    descendants only (the command and whatever it starts, followed through fork in the kernel: no
    other process that maps the same libllama, a llama-server or an Ollama runner, prints a
    thing), and the stacks are sampled in the processes that called into libllama. No syscall
    layer: there is no connection to follow."""
    # @mine's keys are cast to one type: a literal, pid and a tracepoint's pid_t are three, and a
    # lookup with another key type than the map's finds nothing. @gen, @lib and @seen are first
    # set for bpftrace's own pid, so that each exists whichever probes attached.
    lines = [f"BEGIN {{ @mine[(int64){ancestor}] = 1; @gen[pid] = 0; @lib[pid] = 0; @seen[pid, 0] = 0; "
             f'printf("{READY}\\n"); }}',
             "tracepoint:sched:sched_process_fork /@mine[(int64)pid]/ { @mine[(int64)args->child_pid] = 1; }",
             "tracepoint:sched:sched_process_exit /@mine[(int64)pid] && pid == tid/ "
             "{ delete(@mine[(int64)pid]); delete(@lib[pid]); }"]
    if profile_hz > 0:
        lines.append(ebpf_profile.probe(profile_hz, "@lib[pid]"))
    for index, (symbol, (spec, _)) in enumerate(sorted(plan.attached.items(), key=lambda i: i[1][1])):
        event = f'printf("U %llu %d %d {index}\\n", nsecs, pid, tid);'
        if spec.per_token:  # the first hit after the call's start only (see build_script)
            lines.append(f"uprobe:{plan.targets[symbol]} /@mine[(int64)pid] && @seen[pid, {index}] != @gen[pid]/ "
                         f"{{ @lib[pid] = 1; @seen[pid, {index}] = @gen[pid]; {event} }}")
        else:
            lines.append(f"uprobe:{plan.targets[symbol]} /@mine[(int64)pid]/ {{ @lib[pid] = 1; @gen[pid]++; {event} }}")
    end = ebpf_profile.END if profile_hz > 0 else ""
    lines.append(f"END {{ {end}clear(@seen); clear(@gen); clear(@mine); clear(@lib); }}")
    return "\n".join(lines) + "\n"


def library_dir(binary: Path) -> Path | None:
    """Where Ollama looks for its runner libraries, in its own order (ml/path.go): next to the
    binary's parent (an install's lib/ollama), beside the binary, or in a build tree."""
    for candidate in (binary.parent.parent / "lib" / "ollama", binary.parent / "lib" / "ollama",
                      binary.parent / "build" / "lib" / "ollama"):
        if candidate.is_dir():
            return candidate
    # llama-server alone: its libraries beside it (Ollama's lib/ollama, a llama.cpp build's bin/),
    # or in the lib/ beside its bin/ (an install).
    for candidate in (binary.parent, binary.parent.parent / "lib"):
        if (candidate / "libllama.so").exists():
            return candidate
    return None


def _plan_libraries(plan: ProbePlan, specs: list[ProbeSpec]) -> list[str]:
    """Attach what the runner's shared libraries export; returns the symbols not found."""
    if not specs:
        return []
    from ollama_tracer.collectors.symbols import SymbolTable

    plan.library_dir = plan.library_dir or library_dir(plan.binary)
    missing: list[str] = []
    by_library: dict[str, list[ProbeSpec]] = {}
    for spec in specs:
        by_library.setdefault(spec.library or "", []).append(spec)
    for library, wanted in by_library.items():
        path = plan.library_dir / library if plan.library_dir else None
        try:
            table = SymbolTable.load(path) if path is not None and path.exists() else None
        except (OSError, ValueError):
            table = None
        if table is None or path is None:
            missing += [spec.symbol for spec in wanted]
            continue
        mangled = _mangled_names(table.names(), {spec.symbol for spec in wanted})
        for spec in wanted:
            name = mangled.get(spec.symbol)
            symbol = table.lookup(name) if name else None
            if name is None or symbol is None:
                missing.append(spec.symbol)
                continue
            plan.attached[spec.symbol] = (spec, symbol.address)
            plan.targets[spec.symbol] = f"{path}:{name}"
    return missing


def _mangled_names(names: list[str], wanted: set[str]) -> dict[str, str]:
    """Each wanted function (a C name, or a C++ qualified name without parameters) → the one symbol
    that exports it. A C++ name is matched on its demangled form (binutils' c++filt); an overloaded
    one keeps its first exported definition."""
    import subprocess

    out: dict[str, str] = {name: name for name in names if name in wanted}
    # Not a function's entry: a compiler's partial copy (``.cold``, ``.constprop.0``, ``.isra.0``) or a
    # function local to another (``_ZZ``: a lambda inside it, which demangles with its name in front).
    cpp = [name for name in names if name.startswith("_Z") and not name.startswith("_ZZ") and "." not in name]
    if not cpp or not (wanted - out.keys()):
        return out
    try:
        demangled = subprocess.run(["c++filt"], input="\n".join(cpp), capture_output=True, text=True,
                                   timeout=60, check=True).stdout.splitlines()
    except (OSError, subprocess.SubprocessError):
        return out
    for name, readable in zip(cpp, demangled, strict=False):
        qualified = readable.split("(", 1)[0]
        if qualified in wanted and qualified not in out and ")::" not in readable:
            out[qualified] = name
    return out


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


def _comm_filter(comms: list[str]) -> str:
    filt = " || ".join(f'comm == "{comm}"' for comm in comms)
    return f"({filt})" if len(comms) > 1 else filt


def build_script(plan: ProbePlan, profile_hz: int = 0, held: list[HeldSocket] | None = None,
                 extra_comms: list[str] | None = None) -> str:
    """The bpftrace program for ``plan``: ``ebpf_program.bt`` with the capture's processes and probes.
    ``extra_comms``: other processes whose syscalls are traced (a port forwarder), not sampled."""
    comms = process_names(plan)
    filt = _comm_filter(comms)
    traced = _comm_filter([*comms, *(extra_comms or [])])
    held = [h for comm in [*comms, *(extra_comms or [])] for h in existing_sockets(comm)] if held is None else held
    primed = " ".join(f"@sock[{h.pid}, {h.fd}] = 3;" for h in held)
    lines: list[str] = []
    if profile_hz > 0:
        lines.append(ebpf_profile.probe(profile_hz, filt))
    go = plan.goroutines
    # With the goroutine layer every uprobe also says which goroutine it ran on, and which started it.
    ids = (f' %llu %llu\\n", nsecs, pid, tid, *(uint64*)(reg("r14") + {go.g_goid}), '
           f'*(uint64*)(reg("r14") + {go.g_parent_goid})') if go else '\\n", nsecs, pid, tid'
    for index, (symbol, (spec, address)) in enumerate(sorted(plan.attached.items(), key=lambda i: i[1][1])):
        target = plan.targets.get(symbol) or f"{plan.binary}:{address:#x}"
        # A runner library's probe fires in every process that maps it: ours only.
        only = f"{filt}" if symbol in plan.targets else ""
        if spec.per_token:
            # A per-token function fires thousands of times a second while a stream runs; only
            # the first hit after any other event of that process is a boundary. Printing every
            # hit overflowed bpftrace's buffer under load ("Lost N events"), and what was lost
            # was as likely a boundary as a repeat.
            first = f"@seen[pid, {index}] != @gen[pid]"
            cond = f" /{only} && {first}/" if only else f" /{first}/"
            lines.append(f'uprobe:{target}{cond} {{ @seen[pid, {index}] = @gen[pid]; '
                         f'printf("U %llu %d %d {index}{ids}); }}')
        else:
            cond = f" /{only}/" if only else ""
            lines.append(f'uprobe:{target}{cond} {{ @gen[pid]++; printf("U %llu %d %d {index}{ids}); }}')
    if go:
        goid = f'*(uint64*)(reg("r14") + {go.g_goid})'
        serve_fd = go.fd_of_conn_iface(f'reg("ax") + {go.http_conn_rwc}')
        trip_fd = go.fd_of_conn_iface(f'reg("ax") + {go.persist_conn_conn}')
        for kind, key, fd in (("G", "serve", serve_fd), ("T", "round_trip", trip_fd)):
            lines.append(f'uprobe:{plan.binary}:{plan.goroutine_probes[key]:#x} '
                         f'{{ printf("{kind} %llu %d %d %lld %llu\\n", nsecs, pid, tid, {fd}, {goid}); }}')
    values = {"F": traced, "PRIMED": primed, "READY": READY, "PROBES": "".join(f"{line}\n" for line in lines),
              # a map no probe uses is an error to bpftrace: @seen exists only with per-token probes
              "CLEAR_SEEN": "clear(@seen); " if any(spec.per_token for spec, _ in plan.attached.values()) else "",
              "PROFILE_END": ebpf_profile.END if profile_hz > 0 else ""}
    # One pass, so that nothing filled in (a binary's path, say) is itself taken for a placeholder.
    return _PLACEHOLDER.sub(lambda found: values[found.group(1)], PROGRAM.read_text(encoding="utf-8"))


def probe_index(plan: ProbePlan) -> dict[int, str]:
    ordered = sorted(plan.attached.items(), key=lambda i: i[1][1])
    return {index: symbol for index, (symbol, _) in enumerate(ordered)}
