"""Run a command under observation and attribute every Ollama request it makes.

`tracer capture [options] -- CMD [ARGS...]` starts the collectors, gives the command an OTLP
endpoint on loopback (Python commands are auto-instrumented with no code change), waits for
it, then writes the capture directory: capture.json, spans.jsonl, attribution.json,
trace.perfetto.json and raw/ (the records everything else is recomputed from). It prints the
attribution table and, with --otlp-endpoint, exports one trace per request to Jaeger.

For `tracer bench interrupt` an interval is interrupt → second-stage first token; for any other
command it is each request's send → first token. The exit code is the command's.
Ctrl-C or SIGTERM stops the command, flushes every collector and keeps what was recorded.

Example:  tracer capture -o cap1 --otlp-endpoint http://127.0.0.1:4317 -- tracer bench interrupt --model M
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ollama_tracer.attribution.analysis import compute
from ollama_tracer.capture.session import CaptureOptions, default_directory, resolve_command, run_capture
from ollama_tracer.collectors.ebpf_profile import DEFAULT_HZ
from ollama_tracer.collectors.registry import CollectorOptions, make_collectors
from ollama_tracer.commands.arguments import (
    add_log_arguments,
    add_otlp_arguments,
    add_show_argument,
    export_if_asked,
    log_source,
    rate,
)
from ollama_tracer.deployment import server_pid
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.exporters import table as table_exporter
from ollama_tracer.exporters import write_outputs
from ollama_tracer.ollama_host import resolve_host

AUTO = "auto"  # --in-process without a path: find the library


def _bench_in_process(command: list[str]) -> bool:
    """``tracer bench interrupt --backend llama-cpp-python``: our own bench, in process."""
    from itertools import pairwise

    return "bench" in command and ("--backend=llama-cpp-python" in command
                                   or ("--backend", "llama-cpp-python") in set(pairwise(command)))


def in_process_library(given: str) -> Path:
    """The libllama.so that llama-cpp-python loads: the one given (a file, or a directory holding
    it), else $LLAMA_CPP_LIB_PATH's, the installed package's own, or the testbed's build."""
    import importlib.util
    import os

    from ollama_tracer.testbed.standalone import lib_dir

    if given != AUTO:
        path = Path(given).expanduser()
        candidates = [path / "libllama.so" if path.is_dir() else path]
    else:
        env = os.environ.get("LLAMA_CPP_LIB_PATH")
        candidates = [Path(env) / "libllama.so"] if env else []
        spec = importlib.util.find_spec("llama_cpp")  # found, not imported: importing it loads the library
        if spec is not None and spec.origin:
            candidates.append(Path(spec.origin).parent / "lib" / "libllama.so")
        candidates.append(lib_dir() / "libllama.so")
    for candidate in candidates:
        if candidate.is_file():
            return candidate.resolve()
    raise TracerError(f"no libllama.so for the in-process probes (looked at {', '.join(map(str, candidates))}); "
                      "pass --in-process PATH, or --no-ebpf.", ExitCode.USAGE)


class CaptureCommand:
    """Run a command under observation; write a capture directory and the attribution table."""

    name = "capture"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("-o", "--output", type=Path, help="capture directory (default: capture-CMD-TIMESTAMP)")
        parser.add_argument("--force", action="store_true", help="overwrite the capture files in an existing -o")
        add_otlp_arguments(parser)
        parser.add_argument("--ollama-host", help="the Ollama the command talks to (default: $OLLAMA_HOST)")
        parser.add_argument("--record-content", action="store_true",
                            help="let the instrumentation record prompt and completion text (off by default)")
        parser.add_argument("--no-ebpf", action="store_true", help="do not run the eBPF collector")
        parser.add_argument("--ebpf-layers", choices=("all", "syscall"), default="all",
                            help="all: syscall tracepoints plus catalogue uprobes (default); syscall: tracepoints only")
        parser.add_argument("--ollama-pid", type=int,
                            help="the Ollama server's pid (default: the process listening on the --ollama-host port)")
        parser.add_argument("--in-process", nargs="?", const=AUTO, metavar="LIBLLAMA",
                            help="the command runs llama.cpp in its own process (llama-cpp-python), no server: "
                                 "probe its libllama.so (this file or directory; default: $LLAMA_CPP_LIB_PATH's, "
                                 "the package's own, or the testbed's) in the command's processes. On by itself "
                                 "for `tracer bench interrupt --backend llama-cpp-python`.")
        add_log_arguments(parser)
        parser.add_argument("--profile-hz", type=rate, default=DEFAULT_HZ, metavar="HZ",
                            help=f"eBPF native stack samples of the server and runners per second "
                                 f"(default {DEFAULT_HZ}; 0: off)")
        parser.add_argument("--gpu-rate", type=rate, default=100, metavar="HZ",
                            help="NVML GPU samples per second (default 100; 0: off); skipped without a GPU")
        parser.add_argument("--pyspy-rate", type=rate, default=100, metavar="HZ",
                            help="py-spy stack samples per second of the command's Python processes "
                                 "(default 100; 0: off)")
        parser.add_argument("--pyspy-pid", type=int, metavar="PID",
                            help="sample this Python process with py-spy instead of the command")
        add_show_argument(parser)
        parser.add_argument("--no-auto-instrument", action="store_true",
                            help="do not auto-instrument Python commands (spans they export still land)")
        parser.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD [ARGS...]")

    def run(self, args: argparse.Namespace) -> int:
        command = resolve_command(args.cmd)
        directory = args.output or default_directory(command)
        in_process = args.in_process or (AUTO if _bench_in_process(command) else None)
        library = in_process_library(in_process) if in_process and not args.no_ebpf else None
        # In process there is no server: nothing is asked of an Ollama that may run beside it.
        host = None if in_process else resolve_host(args.ollama_host)
        ollama_pid = None if in_process else args.ollama_pid or server_pid(host)
        log, unit = (None, None) if in_process else log_source(args, host, ollama_pid)
        if in_process:
            print(f"tracer: llama.cpp runs inside the command's own process (one process, no server); "
                  f"probing {library or 'nothing (--no-ebpf)'}.", file=sys.stderr)
        result = run_capture(
            CaptureOptions(command=command, directory=directory, force=args.force, ollama_host=host,
                           ollama_pid=ollama_pid, record_content=args.record_content,
                           auto_instrument=not args.no_auto_instrument),
            make_collectors(CollectorOptions(
                ebpf=not args.no_ebpf, ollama_pid=ollama_pid, ebpf_layers=args.ebpf_layers,
                profile_hz=args.profile_hz, ollama_log=log, ollama_unit=unit,
                record_content=args.record_content, gpu_rate_hz=args.gpu_rate, pyspy_rate_hz=args.pyspy_rate,
                pyspy_pid=args.pyspy_pid, in_process=library)),
            progress=lambda message: print(message, file=sys.stderr),
        )
        if not result.command_started:
            print(f"tracer: interrupted while the collectors started; {command[0]} was not run "
                  f"({directory}/capture.json says what had started).", file=sys.stderr)
            return int(ExitCode.INTERRUPTED)
        try:
            data = compute(directory)
            written = write_outputs(directory, data)
        except KeyboardInterrupt:
            # The capture itself is complete on disk; only the derived files may be missing.
            print(f"tracer: interrupted while writing the report; the capture is complete: `tracer report "
                  f"{directory}` writes it again.", file=sys.stderr)
            return int(ExitCode.INTERRUPTED)
        print()
        table_exporter.render(sys.stdout, data, show=args.show)
        drops = {k: v for k, v in data.meta.get("drops", {}).items() if v}
        if drops:
            print(f"tracer: WARNING: data was dropped: {drops}", file=sys.stderr)
        print(f"Wrote {directory}/ ({', '.join(p.name for p in written)}). "
              f"Open report.html in a browser (offline), or trace.perfetto.json in https://ui.perfetto.dev; "
              f"re-read with `tracer report {directory}`.")
        export_if_asked(directory, args)
        if result.interrupted and result.exit_code == 0:
            return int(ExitCode.INTERRUPTED)
        return result.exit_code
