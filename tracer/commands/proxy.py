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
With --otlp-endpoint the traces also go to Jaeger. The proxy binds loopback unless
--allow-remote is given for a non-loopback --listen address.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import ipaddress
import os
import sys
import time
from pathlib import Path
from typing import Any

from collectors.base import SessionInfo
from collectors.registry import CollectorOptions, make_collectors
from tracer import capture_dir
from tracer.capture import CaptureOptions, run_capture
from tracer.commands.capture import add_otlp_arguments, add_show_argument, export_capture
from tracer.errors import ExitCode, TracerError
from tracer.exporters import table as table_exporter
from tracer.pipeline import compute, write_outputs
from tracer.process_discovery import ollama_server_pid


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
        parser.add_argument("--allow-remote", action="store_true",
                            help="allow a non-loopback --listen address (anyone who reaches it can use Ollama)")
        parser.add_argument("--record-content", action="store_true",
                            help="record prompt and completion text (off by default)")
        parser.add_argument("--no-ebpf", action="store_true", help="do not run the eBPF collector on the upstream")
        parser.add_argument("--ollama-log", type=Path, help="the upstream server's log (OLLAMA_DEBUG=1)")
        add_show_argument(parser)

    def run(self, args: argparse.Namespace) -> int:
        host, port = args.listen
        if not is_loopback(host):
            if not args.allow_remote:
                raise TracerError(f"--listen {host}:{port} is not a loopback address; add --allow-remote to "
                                  "expose Ollama through the proxy to the network.", ExitCode.USAGE)
            print(f"tracer proxy: WARNING: listening on {host}:{port}: anyone who can reach it can use Ollama "
                  "and is traced.", file=sys.stderr)
        from tracer.proxy import check_listen

        try:
            check_listen(host, port)
        except OSError as err:
            if err.errno == errno.EADDRINUSE:
                raise TracerError(f"{host}:{port} is already in use; choose another --listen port.",
                                  ExitCode.ADDRESS_IN_USE) from None
            raise TracerError(f"cannot listen on {host}:{port} ({err.strerror}).", ExitCode.USAGE) from None
        upstream = args.upstream if "://" in args.upstream else f"http://{args.upstream}"
        directory = args.output or Path(f"proxy-{time.strftime('%Y%m%d-%H%M%S')}")
        collectors = make_collectors(CollectorOptions(
            ebpf=not args.no_ebpf, ollama_pid=ollama_server_pid(upstream), ollama_log=args.ollama_log,
            record_content=args.record_content, pyspy_rate_hz=0))
        workload = ProxyWorkload(host, port, upstream, args.record_content, args.duration)
        result = run_capture(
            CaptureOptions(command=["tracer", "proxy", f"--listen={host}:{port}", f"--upstream={upstream}"],
                           directory=directory, force=args.force, ollama_host=upstream,
                           record_content=args.record_content, mode="proxy"),
            collectors, progress=lambda message: print(message, file=sys.stderr), workload=workload.run)
        data = compute(directory)
        written = write_outputs(directory, data)
        table_exporter.render(sys.stdout, data, show=args.show)
        stats = workload.stats
        latency = stats.get("added_latency", {}).get("first_chunk_forward", {})
        print(f"Proxied {stats.get('requests', 0)} request(s): {stats.get('traced', 0)} traced, "
              f"{stats.get('cancelled', 0)} closed early by the client, {stats.get('failed_total', 0)} failed; "
              f"added latency per first chunk: median {latency.get('median_us')} µs, p99 {latency.get('p99_us')} µs.")
        print(f"Wrote {directory}/ ({', '.join(p.name for p in written)}).")
        if args.otlp_endpoint:
            try:
                exported = export_capture(directory, args.otlp_endpoint, args.otlp_protocol)
                print(f"Exported {exported['exported_spans']} spans to {args.otlp_endpoint}.")
            except TracerError as err:
                print(f"tracer: warning: {err.message}", file=sys.stderr)
        return int(ExitCode.OK) if result.exit_code == 0 else result.exit_code


class ProxyWorkload:
    """The proxy, run inside a capture session: its spans go to the session's OTLP receiver."""

    def __init__(self, host: str, port: int, upstream: str, record_content: bool, duration: float | None) -> None:
        self.host, self.port, self.upstream = host, port, upstream
        self.record_content = record_content
        self.duration = duration
        self.stats: dict[str, Any] = {}

    def run(self, session: SessionInfo, signals: Any) -> int:
        from opentelemetry.sdk.resources import Resource
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        from tracer.otel_setup import MAX_EXPORT_BATCH, MAX_QUEUE_SIZE, make_otlp_exporter
        from tracer.proxy import PROXY_SERVICE, OllamaProxy, serve

        provider = TracerProvider(resource=Resource.create({"service.name": PROXY_SERVICE,
                                                            "process.pid": os.getpid()}))
        endpoint = session.child_env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        if endpoint:
            provider.add_span_processor(BatchSpanProcessor(
                make_otlp_exporter(endpoint, session.child_env.get("OTEL_EXPORTER_OTLP_PROTOCOL", "grpc")),
                max_queue_size=MAX_QUEUE_SIZE, max_export_batch_size=MAX_EXPORT_BATCH))
        proxy = OllamaProxy(self.upstream, tracer=provider.get_tracer("tracer.proxy"),
                            record_content=self.record_content)
        deadline = time.monotonic() + self.duration if self.duration else None

        def stop() -> bool:
            return bool(signals.received) or (deadline is not None and time.monotonic() >= deadline)

        def ready(bound: int) -> None:
            print(f"tracer proxy: http://{self.host}:{bound} → {self.upstream}; "
                  f"set OLLAMA_HOST=http://{self.host}:{bound}. Ctrl-C stops and writes the capture.",
                  file=sys.stderr, flush=True)

        try:
            asyncio.run(serve(proxy, self.host, self.port, stop, ready))
        finally:
            provider.shutdown()  # flush every span to the receiver before the collectors stop
            self.stats = proxy.stats.to_json()
            capture_dir.write_json(session.raw_dir / "proxy_stats.json", self.stats)
        return 0
