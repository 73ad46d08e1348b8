"""Observe an Ollama that is already running, without restarting or changing anything.

`tracer attach --ollama-port 11434 [--duration 60] [-o DIR]` (or --ollama-pid PID)

For the window (until --duration seconds pass, or Ctrl-C), it records the server and its
runners with eBPF (syscalls, catalogue uprobes and stacks), the server log when --ollama-log
is given, and the GPU. Every generate/chat request any client makes during the window is
found from the server's side (its reads and writes on the client connections), and every
interrupt (a client resetting a stream, then a new request) is attributed as in
`tracer capture`. Clients need no change; to tell concurrent clients apart and see their own
side too, run them through `tracer proxy`, which records the same server-side evidence.
Needs root (or CAP_BPF and CAP_PERFMON) for eBPF.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from ollama_tracer.attribution.analysis import compute
from ollama_tracer.capture.session import CaptureOptions, run_capture
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.ebpf_profile import DEFAULT_HZ
from ollama_tracer.collectors.registry import CollectorOptions, make_collectors
from ollama_tracer.commands.arguments import (
    add_log_arguments,
    add_otlp_arguments,
    add_show_argument,
    export_if_asked,
    log_source,
)
from ollama_tracer.deployment import follow
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.exporters import table as table_exporter
from ollama_tracer.exporters import write_outputs
from ollama_tracer.process_discovery import process_alive


def listening_port(pid: int) -> int | None:
    """The TCP port process ``pid`` listens on (its API port), if any."""
    from ollama_tracer.netstat import LISTEN, socket_fds, tcp_rows

    inodes = set(socket_fds(pid).values())
    ports = sorted(r.local_port for r in tcp_rows() if r.state == LISTEN and r.inode in inodes)
    return ports[0] if ports else None


class AttachCommand:
    """Observe an Ollama that is already running: eBPF, log and GPU, for a window of time."""

    name = "attach"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        target = parser.add_mutually_exclusive_group(required=True)
        target.add_argument("--ollama-pid", type=int, metavar="PID", help="the Ollama server's pid")
        target.add_argument("--ollama-port", type=int, metavar="PORT", help="the port the Ollama server listens on")
        parser.add_argument("--duration", type=float, metavar="S", help="end the window after S seconds "
                                                                        "(default: Ctrl-C)")
        parser.add_argument("-o", "--output", type=Path, help="capture directory (default: attach-TIMESTAMP)")
        parser.add_argument("--force", action="store_true", help="overwrite the capture files in an existing -o")
        add_log_arguments(parser)
        parser.add_argument("--profile-hz", type=int, default=DEFAULT_HZ, metavar="HZ",
                            help=f"eBPF stack samples per second (default {DEFAULT_HZ}; 0: off)")
        parser.add_argument("--gpu-rate", type=int, default=100, metavar="HZ",
                            help="NVML samples per second (default 100; 0: off)")
        add_otlp_arguments(parser)
        add_show_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        pid = args.ollama_pid
        port = args.ollama_port
        if pid is None:
            pid, _forwarder = follow(port)  # a published container port: the server behind its forwarder
            if pid is None:
                raise TracerError(f"nothing listens on port {port}; start Ollama or pass its --ollama-pid.",
                                  ExitCode.OLLAMA_UNREACHABLE)
        elif not process_alive(pid):
            raise TracerError(f"no process {pid}; pass the pid of a running `ollama serve`.",
                              ExitCode.OLLAMA_UNREACHABLE)
        else:
            port = listening_port(pid)
        host = f"http://127.0.0.1:{port}" if port else None
        log, unit = log_source(args, host, pid)
        directory = args.output or Path(f"attach-{time.strftime('%Y%m%d-%H%M%S')}")
        collectors = make_collectors(CollectorOptions(
            ebpf=True, ollama_pid=pid, profile_hz=args.profile_hz, ollama_log=log, ollama_unit=unit,
            gpu_rate_hz=args.gpu_rate, pyspy_rate_hz=0))
        window = Window(args.duration, pid)
        result = run_capture(
            CaptureOptions(command=["tracer", "attach", f"--ollama-pid={pid}"], directory=directory,
                           force=args.force, ollama_host=host, ollama_pid=pid, mode="attach"),
            collectors, progress=lambda message: print(message, file=sys.stderr), workload=window.run)
        if not result.meta.get("collectors", {}).get("ebpf", {}).get("ran"):
            reason = result.meta.get("collectors", {}).get("ebpf", {}).get("reason", "")
            raise TracerError(f"attach needs the eBPF collector, which did not run: {reason}", ExitCode.PERMISSION)
        data = compute(directory)
        written = write_outputs(directory, data)
        table_exporter.render(sys.stdout, data, show=args.show)
        print(f"Wrote {directory}/ ({', '.join(p.name for p in written)}).")
        export_if_asked(directory, args)
        return int(ExitCode.OK)


class Window:
    """Wait while the collectors record: until the duration passes, Ctrl-C, or Ollama exits."""

    def __init__(self, duration: float | None, pid: int) -> None:
        self.duration = duration
        self.pid = pid

    def run(self, session: SessionInfo, signals: Any) -> int:
        deadline = time.monotonic() + self.duration if self.duration else None
        print(f"tracer attach: recording Ollama pid {self.pid}"
              + (f" for {self.duration:g} s" if deadline else "") + "; Ctrl-C ends the window.",
              file=sys.stderr, flush=True)
        while not signals.received and (deadline is None or time.monotonic() < deadline):
            if not Path(f"/proc/{self.pid}").exists():
                print(f"tracer attach: Ollama pid {self.pid} exited; ending the window.", file=sys.stderr)
                return int(ExitCode.OLLAMA_UNREACHABLE)
            time.sleep(0.1)
        return 0
