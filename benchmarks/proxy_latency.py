"""What `tracer proxy` adds to a request: time to first chunk, direct vs through the proxy.

Starts `tracer proxy` (no eBPF: this measures the proxy alone) in front of the testbed's Ollama,
then sends streamed /api/generate requests alternately straight to Ollama and through the proxy
(A, B, A, B, ... in one run, so drift and noise hit both alike). For each request it times the
client's view: request sent → first chunk read. It prints the median and p99 of each arm, the
difference of medians, and the proxy's own measurement of its added latency (chunk arrived from
upstream → written to the client), which is what the attribution shows as proxy.first_token.

    python3 benchmarks/proxy_latency.py [--requests 200] [--model tracer-llama:test] [--json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import requests

REPO = Path(__file__).resolve().parent.parent


def first_chunk_ms(url: str, model: str, session: requests.Session) -> float:
    body = {"model": model, "prompt": "hi", "options": {"num_predict": 2}}
    started = time.perf_counter()
    with session.post(f"{url}/api/generate", json=body, stream=True, timeout=60) as response:
        response.raise_for_status()
        lines = response.iter_lines()  # one iterator: a second one would lose what the first had buffered
        next(line for line in lines if line)
        elapsed = (time.perf_counter() - started) * 1000
        for _ in lines:
            pass  # read to the end: the connection goes back to the pool, and Ollama sees no interrupt
    return elapsed


@contextlib.contextmanager
def _stall_is_an_error() -> Iterator[None]:
    try:
        yield
    except requests.Timeout:
        raise SystemExit("Ollama stopped answering (the v0.13 interrupt deadlock, README): run `tracer testbed up` "
                         "to restart it, then run this again.") from None


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200, help="requests per arm (default 200)")
    parser.add_argument("--model", default="tracer-llama:test")
    parser.add_argument("--host", default=os.environ.get("OLLAMA_HOST", ""),
                        help="the Ollama server (default: $OLLAMA_HOST, e.g. from `tracer testbed env`)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")
    args = parser.parse_args()
    if not args.host:
        parser.error("no Ollama host: run `eval \"$(tracer testbed env)\"` or pass --host")
    host = args.host if "://" in args.host else f"http://{args.host}"
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        proc = subprocess.Popen([sys.executable, "-m", "ollama_tracer", "proxy", "--listen", f"127.0.0.1:{port}",
                                 "--upstream", host, "--no-ebpf", "-o", str(Path(tmp) / "cap")],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while True:
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise SystemExit(f"the proxy did not start: {proc.communicate()[1]}") from None
                    time.sleep(0.1)
            proxied_url = f"http://127.0.0.1:{port}"
            arms: dict[str, list[float]] = {"direct": [], "proxy": []}
            with requests.Session() as direct, requests.Session() as via, _stall_is_an_error():
                for _ in range(3):  # warm both paths (model loaded, connections pooled)
                    first_chunk_ms(host, args.model, direct)
                    first_chunk_ms(proxied_url, args.model, via)
                for index in range(args.requests * 2):
                    if index % 2 == 0:
                        arms["direct"].append(first_chunk_ms(host, args.model, direct))
                    else:
                        arms["proxy"].append(first_chunk_ms(proxied_url, args.model, via))
        finally:
            proc.send_signal(signal.SIGINT)
            proc.communicate(timeout=120)
        stats = json.loads((Path(tmp) / "cap" / "raw" / "proxy_stats.json").read_text())
    own = stats["added_latency"]
    result = {
        "requests_per_arm": args.requests, "model": args.model,
        "direct_ms": {"median": round(statistics.median(arms["direct"]), 3), "p99": round(p99(arms["direct"]), 3)},
        "proxy_ms": {"median": round(statistics.median(arms["proxy"]), 3), "p99": round(p99(arms["proxy"]), 3)},
        "proxy_own_us": {"first_chunk_forward": own["first_chunk_forward"], "request_forward": own["request_forward"]},
    }
    result["added_median_ms"] = round(result["proxy_ms"]["median"] - result["direct_ms"]["median"], 3)
    result["added_p99_ms"] = round(result["proxy_ms"]["p99"] - result["direct_ms"]["p99"], 3)
    result["ratio_median"] = round(result["proxy_ms"]["median"] / result["direct_ms"]["median"], 3)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"time to first chunk, {args.requests} requests per arm, interleaved ({args.model}):")
    print(f"  direct       median {result['direct_ms']['median']:8.3f} ms   p99 {result['direct_ms']['p99']:8.3f} ms")
    print(f"  via proxy    median {result['proxy_ms']['median']:8.3f} ms   p99 {result['proxy_ms']['p99']:8.3f} ms")
    print(f"  added        median {result['added_median_ms']:8.3f} ms   p99 {result['added_p99_ms']:8.3f} ms   "
          f"(ratio of medians {result['ratio_median']})")
    fc, rf = own["first_chunk_forward"], own["request_forward"]
    print(f"  proxy's own: first chunk in → out median {fc['median_us']} µs, p99 {fc['p99_us']} µs; "
          f"request in → upstream written median {rf['median_us']} µs, p99 {rf['p99_us']} µs")
    return 0


if __name__ == "__main__":
    sys.exit(main())
