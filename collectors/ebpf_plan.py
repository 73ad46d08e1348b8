"""The eBPF collector's plan: which probes attach where in one Ollama binary, and the program that says so.

:func:`plan_probes` checks the probe catalogue (``collectors.probe_catalogue``) against the binary:
addresses come from the ELF symbol table, or from Go's ``.gopclntab`` when the binary is stripped;
a missing entry is reported, never fatal. The goroutine layer is planned when the binary's DWARF
gives the offsets (``collectors.go_offsets``). :func:`build_script` fills the bpftrace program
template, ``ebpf_program.bt``, with the capture's processes, sockets and probes.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ollama_tracer.collectors import ebpf_profile
from ollama_tracer.collectors.go_offsets import GoOffsets, read_offsets
from ollama_tracer.collectors.probe_catalogue import ProbeSpec, design_for, probes_for

READY = "TRACER_EBPF_READY"  # the program prints it once its probes are live
# The fixed part of the program. Placeholders: {F} the process filter, {PRIMED} the sockets held at
# start, {READY} the ready marker, {PROBES} the plan's probes (profile, uprobes), one per line.
PROGRAM = Path(__file__).with_name("ebpf_program.bt")
_PLACEHOLDER = re.compile(r"\{(F|PRIMED|READY|PROBES)\}")


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
    """The bpftrace program for ``plan``: ``ebpf_program.bt`` with the capture's processes and probes."""
    comm = comm_of(plan.binary)
    filt = f'comm == "{comm}"'
    primed = " ".join(f"@sock[{h.pid}, {h.fd}] = 3;" for h in (existing_sockets(comm) if held is None else held))
    lines: list[str] = []
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
    values = {"F": filt, "PRIMED": primed, "READY": READY, "PROBES": "".join(f"{line}\n" for line in lines)}
    # One pass, so that nothing filled in (a binary's path, say) is itself taken for a placeholder.
    return _PLACEHOLDER.sub(lambda found: values[found.group(1)], PROGRAM.read_text(encoding="utf-8"))


def probe_index(plan: ProbePlan) -> dict[int, str]:
    ordered = sorted(plan.attached.items(), key=lambda i: i[1][1])
    return {index: symbol for index, (symbol, _) in enumerate(ordered)}
