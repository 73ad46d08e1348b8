"""The testbed's stand-in for what really runs Ollama: systemd (journald) or a container runtime.

Neither systemd nor a Docker engine runs on the machines this testbed targets, so
``python -m ollama_tracer.testbed.supervisor`` does their two jobs that a tracer can see:

* it starts the server (as another user, for the system layout; inside namespaces, for the
  container layout: the command it is given does that) and moves it into the cgroup systemd
  would give it: the unit's (``/system.slice/ollama.service``), or a container's scope
  (``/system.slice/docker-<id>.scope``, Docker's systemd cgroup driver);
* it carries the server's stdout and stderr to where a real deployment puts them:
  ``--log-format journal``: journal entries with the fields journald gives a unit's lines
  (``_SYSTEMD_UNIT``, ``_PID``, ``_UID``, ``SYSLOG_IDENTIFIER``, ...) written by
  ``systemd-journal-remote`` into a journal file that ``journalctl -u ollama`` reads;
  ``--log-format json-file``: Docker's default log driver's lines
  (``{"log": "...\\n", "stream": "stderr", "time": "..."}``).

It exits when the server does, with its code, and passes SIGTERM on.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import pwd
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

JOURNAL_REMOTE = "/usr/lib/systemd/systemd-journal-remote"
CGROUP_ROOTS = (Path("/sys/fs/cgroup/unified"), Path("/sys/fs/cgroup/systemd"), Path("/sys/fs/cgroup"))


def machine_journal_dir() -> Path:
    """Where journalctl looks by default: /var/log/journal/<machine-id>/. A machine without an
    id (a minimal container image) gets one, as systemd's first boot would."""
    machine_id = Path("/etc/machine-id")
    if not machine_id.exists() or not machine_id.read_text().strip():
        subprocess.run(["systemd-machine-id-setup"], check=True, capture_output=True)
    return Path("/var/log/journal") / machine_id.read_text().strip()


def _export_field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", errors="replace")
    if b"\n" in data:  # the export format's binary form: name, newline, 64-bit LE length, data
        return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


def journal_entry(message: str, *, unit: str, pid: int, uid: int, comm: str, boot_id: str,
                  stream_fd: int) -> bytes:
    """One entry in journal export format, with the trusted fields journald adds to a unit's line."""
    now_us = time.time_ns() // 1000
    mono_us = time.clock_gettime_ns(time.CLOCK_BOOTTIME) // 1000
    fields = {
        "__REALTIME_TIMESTAMP": str(now_us), "__MONOTONIC_TIMESTAMP": str(mono_us), "_BOOT_ID": boot_id,
        "_TRANSPORT": "stdout", "PRIORITY": "3" if stream_fd == 2 else "6", "SYSLOG_FACILITY": "3",
        "SYSLOG_IDENTIFIER": comm, "_PID": str(pid), "_UID": str(uid), "_GID": str(uid), "_COMM": comm,
        "_SYSTEMD_UNIT": f"{unit}.service", "_SYSTEMD_CGROUP": f"/system.slice/{unit}.service",
        "_SYSTEMD_SLICE": "system.slice", "MESSAGE": message,
    }
    return b"".join(_export_field(k, v) for k, v in fields.items()) + b"\n"


def json_file_line(message: str, stream: str) -> bytes:
    """One line of Docker's json-file log driver."""
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"
    return (json.dumps({"log": message + "\n", "stream": stream, "time": when}) + "\n").encode()


def join_cgroup(pid: int, path: str) -> list[str]:
    """Put ``pid`` in cgroup ``path`` (``system.slice/ollama.service``) of each writable hierarchy,
    as systemd does for a unit or a scope; the ones it joined."""
    joined = []
    for root in CGROUP_ROOTS:
        if not (root / "cgroup.procs").exists():
            continue
        group = root / path
        try:
            group.mkdir(parents=True, exist_ok=True)
            (group / "cgroup.procs").write_text(str(pid))
        except OSError:
            continue
        joined.append(str(group))
    return joined


class Sink:
    """Where lines go; writes from the two stream threads are serialised."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.lock = threading.Lock()
        self.pid = 0
        self.uid = pwd.getpwnam(args.user).pw_uid if args.user else os.getuid()
        self.boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")
        self.remote: subprocess.Popen[bytes] | None = None
        self.out: IO[bytes]
        if args.log_format == "journal":
            Path(args.output).parent.mkdir(parents=True, exist_ok=True)
            self.remote = subprocess.Popen([JOURNAL_REMOTE, f"--output={args.output}", "-"],
                                           stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                           stderr=open(f"{args.output}.remote.log", "ab"))  # noqa: SIM115
            assert self.remote.stdin is not None
            self.out = self.remote.stdin
        else:
            self.out = open(args.output, "ab")  # noqa: SIM115

    def write(self, line: str, stream_fd: int) -> None:
        if self.args.log_format == "journal":
            data = journal_entry(line, unit=self.args.unit, pid=self.pid, uid=self.uid,
                                 comm=self.args.comm, boot_id=self.boot_id, stream_fd=stream_fd)
        else:
            data = json_file_line(line, "stderr" if stream_fd == 2 else "stdout")
        with self.lock:
            try:
                self.out.write(data)
                self.out.flush()
            except (BrokenPipeError, ValueError):
                pass  # the journal writer is gone; the server must not notice

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.out.close()
        if self.remote is not None:
            self.remote.wait(timeout=10)


def _pump(stream: IO[bytes], sink: Sink, fd: int) -> None:
    for raw in stream:
        sink.write(raw.decode("utf-8", errors="replace").rstrip("\n"), fd)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ollama_tracer.testbed.supervisor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--log-format", choices=("journal", "json-file"), required=True)
    parser.add_argument("--output", required=True, help="the journal file, or the json-file log")
    parser.add_argument("--unit", default="ollama", help="the systemd unit name (journal, cgroup)")
    parser.add_argument("--comm", default="ollama", help="SYSLOG_IDENTIFIER and _COMM of the lines")
    parser.add_argument("--user", help="run the command as this user (and its group)")
    parser.add_argument("--cgroup", metavar="PATH",
                        help="move the server into this cgroup, e.g. system.slice/ollama.service")
    parser.add_argument("command", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    sink = Sink(args)
    user = pwd.getpwnam(args.user) if args.user else None
    if args.cgroup:
        # Join first, so that every process the command starts (unshare's fork, the runners) is in it.
        join_cgroup(os.getpid(), args.cgroup)
    proc = subprocess.Popen(
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        user=user.pw_uid if user else None, group=user.pw_gid if user else None,
        extra_groups=[] if user else None,
    )
    sink.pid = proc.pid
    signal.signal(signal.SIGTERM, lambda *_: proc.terminate())
    assert proc.stdout is not None and proc.stderr is not None
    pumps = [threading.Thread(target=_pump, args=(proc.stdout, sink, 1), daemon=True),
             threading.Thread(target=_pump, args=(proc.stderr, sink, 2), daemon=True)]
    for pump in pumps:
        pump.start()
    code = proc.wait()
    for pump in pumps:
        pump.join(timeout=5)
    sink.close()
    return code


if __name__ == "__main__":
    sys.exit(main())
