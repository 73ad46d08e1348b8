"""Trace any client, in any language: a streaming reverse proxy in front of Ollama.

`tracer proxy --listen 127.0.0.1:11435 --upstream http://127.0.0.1:11434 [-o DIR]`
then point the clients at it: `OLLAMA_HOST=http://127.0.0.1:11435 your-app`.

Every request through the proxy gets its own trace: request received, upstream first byte,
chunks, the client closing early (an interrupt), and Ollama's final timing fields. A stream
the client closes, followed by that client's next request, is an interrupt interval,
attributed as in `tracer capture` (with the eBPF and log sources when they are available).
The proxy's own added latency is measured and shown as the phases proxy.request and
proxy.first_token. Prompts and completions are not recorded unless --record-content.

It runs until Ctrl-C (or --duration), then writes the capture directory and prints the table.
For a proxy that runs all day, --segment S rolls to a new capture directory every S seconds
(DIR/segment-0001, ...), each attributed (and, with --otlp-endpoint, exported to Jaeger) as it
closes; --keep N bounds the disk. Memory stays bounded either way: a request's state lives only
while it runs, and spans go to disk as they end. An interval cut by a segment boundary loses the
server-side evidence recorded before it. The proxy binds loopback unless --allow-remote is
given for a non-loopback --listen address.
"""

from __future__ import annotations

import argparse
import errno
import ipaddress
import os
import sys
import time
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files
from ollama_tracer.attribution.analysis import compute
from ollama_tracer.capture.session import CaptureOptions, run_capture
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.registry import CollectorOptions, make_collectors
from ollama_tracer.commands.arguments import (
    add_log_arguments,
    add_otlp_arguments,
    add_show_argument,
    export_if_asked,
    log_source,
)
from ollama_tracer.deployment import server_pid
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.exporters import table as table_exporter
from ollama_tracer.exporters import write_outputs


def parse_listen(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    host = host.strip("[]") or "127.0.0.1"
    try:
        number = int(port)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT") from None
    if not 0 <= number <= 65535:
        raise argparse.ArgumentTypeError(f"port {number} is outside 0..65535")
    return host, number


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ProxyCommand:
    """Trace any client, in any language, through a streaming reverse proxy in front of Ollama."""

    name = "proxy"

    def prepare_parser(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--listen", type=parse_listen, default=("127.0.0.1", 11435), metavar="HOST:PORT",
                            help="where clients connect (default 127.0.0.1:11435)")
        parser.add_argument("--upstream", default=os.environ.get("OLLAMA_HOST") or "http://127.0.0.1:11434",
                            help="the Ollama server (default: $OLLAMA_HOST or http://127.0.0.1:11434)")
        parser.add_argument("-o", "--output", type=Path,
                            help="capture directory (default: proxy-TIMESTAMP)")
        parser.add_argument("--force", action="store_true", help="overwrite the capture files in an existing -o")
        add_otlp_arguments(parser)
        parser.add_argument("--duration", type=float, metavar="S", help="stop after S seconds (default: Ctrl-C)")
        parser.add_argument("--segment", type=float, default=0, metavar="S",
                            help="roll to a new capture directory (DIR/segment-NNNN) every S seconds, each "
                                 "attributed and exported when it closes (default 0: one capture for the whole run)")
        parser.add_argument("--keep", type=int, default=24, metavar="N",
                            help="with --segment, keep the newest N segments on disk (default 24)")
        parser.add_argument("--allow-remote", action="store_true",
                            help="allow a non-loopback --listen address (anyone who reaches it can use Ollama)")
        parser.add_argument("--record-content", action="store_true",
                            help="record prompt and completion text (off by default)")
        parser.add_argument("--no-ebpf", action="store_true", help="do not run the eBPF collector on the upstream")
        add_log_arguments(parser)
        add_show_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        host, port = args.listen
        if not is_loopback(host):
            if not args.allow_remote:
                raise TracerError(f"--listen {host}:{port} is not a loopback address; add --allow-remote to "
                                  "expose Ollama through the proxy to the network.", ExitCode.USAGE)
            print(f"tracer proxy: WARNING: listening on {host}:{port}: anyone who can reach it can use Ollama "
                  "and is traced.", file=sys.stderr)
        from ollama_tracer.proxy import ProxyServer, check_listen

        try:
            check_listen(host, port)
        except OSError as err:
            raise _listen_error(host, port, err) from None
        upstream = args.upstream if "://" in args.upstream else f"http://{args.upstream}"
        directory = args.output or Path(f"proxy-{time.strftime('%Y%m%d-%H%M%S')}")
        # It starts listening inside the first segment, once the collectors are live, so that the
        # first requests are traced on both sides.
        server = ProxyServer(host, port, upstream, record_content=args.record_content)
        deadline = time.monotonic() + args.duration if args.duration else None
        segments: list[Path] = []
        exit_code = int(ExitCode.OK)
        log, unit = log_source(args, upstream, server_pid(upstream))
        try:
            while True:
                index = len(segments) + 1
                segment = directory / f"segment-{index:04d}" if args.segment else directory
                window = ProxyWindow(server, args.segment or None, deadline)
                result = run_capture(
                    CaptureOptions(command=["tracer", "proxy", f"--listen={host}:{port}", f"--upstream={upstream}"],
                                   directory=segment, force=args.force, ollama_host=upstream,
                                   record_content=args.record_content, mode="proxy"),
                    make_collectors(CollectorOptions(
                        ebpf=not args.no_ebpf, ollama_pid=server_pid(upstream), ollama_log=log, ollama_unit=unit,
                        record_content=args.record_content, pyspy_rate_hz=0)),
                    progress=lambda message: print(message, file=sys.stderr), workload=window.run)
                if server.bound_port is None:  # Ctrl-C while the collectors started: nothing was proxied
                    print(f"tracer proxy: stopped before it began listening; {segment}/ holds only the "
                          "collectors' start-up.", file=sys.stderr)
                    return int(ExitCode.INTERRUPTED)
                segments.append(segment)
                self._report(segment, args, server, final=window.final)
                if result.exit_code != 0:
                    exit_code = result.exit_code
                if args.segment:
                    _prune(segments, args.keep)
                if window.final:
                    break
        finally:
            server.stop()
        return exit_code

    @staticmethod
    def _report(segment: Path, args: argparse.Namespace, server: Any, *, final: bool) -> None:
        data = compute(segment)
        written = write_outputs(segment, data)
        if final or not args.segment:
            table_exporter.render(sys.stdout, data, show=args.show)
        stats = server.proxy.stats.to_json()
        latency = stats.get("added_latency", {}).get("first_chunk_forward", {})
        print(f"Proxied {stats.get('requests', 0)} request(s) so far: {stats.get('traced', 0)} traced, "
              f"{stats.get('cancelled', 0)} closed early by the client, {stats.get('failed_total', 0)} failed; "
              f"added latency per first chunk: median {latency.get('median_us')} µs, p99 {latency.get('p99_us')} µs.",
              flush=True)
        print(f"Wrote {segment}/ ({', '.join(p.name for p in written)}).", flush=True)
        export_if_asked(segment, args)


def _listen_error(host: str, port: int, err: OSError) -> TracerError:
    if err.errno == errno.EADDRINUSE:
        return TracerError(f"{host}:{port} is already in use; choose another --listen port.", ExitCode.ADDRESS_IN_USE)
    return TracerError(f"cannot listen on {host}:{port} ({err.strerror}).", ExitCode.USAGE)


def _prune(segments: list[Path], keep: int) -> None:
    """Keep the newest ``keep`` segments on disk: a proxy that runs all day stays bounded."""
    import shutil

    for old in segments[:-keep] if keep > 0 else []:
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)


class ProxyWindow:
    """One segment of the proxy's life: until the segment's length, the overall deadline, or Ctrl-C.
    Its spans reach this segment's receiver, and the proxy's counters go with it."""

    def __init__(self, server: Any, segment_s: float | None, deadline: float | None) -> None:
        self.server = server
        self.segment_s = segment_s
        self.deadline = deadline
        self.final = True

    def run(self, session: SessionInfo, signals: Any) -> int:
        from ollama_tracer.otel_setup import make_otlp_exporter

        if self.server.bound_port is None:
            try:
                bound = self.server.start()
            except OSError as err:
                raise _listen_error(self.server.host, self.server.port, err) from None
            print(f"tracer proxy: http://{self.server.host}:{bound} → {self.server.upstream}; set "
                  f"OLLAMA_HOST=http://{self.server.host}:{bound}. Ctrl-C stops and writes the capture.",
                  file=sys.stderr, flush=True)

        endpoint = session.child_env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint:
            self.server.exporter.retarget(make_otlp_exporter(
                endpoint, session.child_env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")))
        ends = [t for t in (self.deadline, time.monotonic() + self.segment_s if self.segment_s else None) if t]
        end = min(ends) if ends else None
        try:
            while not signals.received and (end is None or time.monotonic() < end):
                if self.server.error is not None:
                    print(f"tracer proxy: the proxy stopped: {self.server.error}", file=sys.stderr)
                    break
                time.sleep(0.1)
        finally:
            self.server.flush()  # every span of an ended request into this segment's receiver
            self.server.exporter.retarget(None)
            stats = self.server.proxy.stats.to_json()
            stats["spans_dropped"] = self.server.exporter.dropped
            capture_files.write_json(session.raw_dir / "proxy_stats.json", stats)
        self.final = bool(signals.received) or self.server.error is not None or (
            self.deadline is not None and time.monotonic() >= self.deadline)
        return 0 if self.server.error is None else int(ExitCode.FAILURE)
