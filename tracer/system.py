"""Facts about this machine that several collectors and `tracer doctor` need."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

CAP_SYS_PTRACE = 19
CAP_SYS_ADMIN = 21
CAP_PERFMON = 38
CAP_BPF = 39
TRACEFS_CANDIDATES = (Path("/sys/kernel/tracing"), Path("/sys/kernel/debug/tracing"))


def effective_capabilities() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    except OSError:
        pass
    return 0


def has_capability(bit: int) -> bool:
    # The effective set, not the uid: root with its capabilities dropped cannot load eBPF.
    return bool(effective_capabilities() >> bit & 1)


def can_bpf() -> bool:
    return has_capability(CAP_BPF) or has_capability(CAP_SYS_ADMIN)


def tracefs_path() -> Path | None:
    """The mounted tracefs, or None. uprobes need ``uprobe_events`` in it."""
    for path in TRACEFS_CANDIDATES:
        if (path / "uprobe_events").exists() or (path / "events").is_dir():
            return path
    return None


def bpftrace_path() -> str | None:
    return os.environ.get("TRACER_BPFTRACE") or shutil.which("bpftrace")


def bpftrace_version(path: str) -> str | None:
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


def ptrace_scope() -> int | None:
    try:
        return int(Path("/proc/sys/kernel/yama/ptrace_scope").read_text().strip())
    except (OSError, ValueError):
        return None
