"""How often does Ollama stall after an interrupt? N interrupts per version, bounded in time.

For each Ollama version of the testbed it runs `tracer bench interrupt` (the second stage's
first token after each interrupt) until N interrupts are done or the time budget is spent. A stall
is the server accepting a request and then sending nothing for --request-timeout seconds (the
bench exits 11 and its JSON says at which iteration); the server is then restarted and the count
goes on. Prints one row per version: interrupts done, stalls, after how many interrupts each came.

    python3 benchmarks/interrupt_stall.py --versions 0.13.5,0.34.4 --interrupts 200 --model tracer-llama:test
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any


def _tracer(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollama_tracer", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _server(version: str) -> dict[str, Any]:
    proc = _tracer("testbed", "up", "--ollama", version, "--json", timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"testbed up --ollama {version} failed: {proc.stderr.strip()[-500:]}")
    description = json.loads(proc.stdout)
    return next(s for s in description["servers"] if s["version"] == version)


def measure(version: str, *, interrupts: int, budget_s: float, model: str, interrupt_after_ms: float,
            request_timeout_s: float) -> dict[str, Any]:
    server = _server(version)
    done, stalls, started = 0, [], time.monotonic()
    with tempfile.TemporaryDirectory() as tmp:
        while done < interrupts and time.monotonic() - started < budget_s:
            batch = min(50, interrupts - done)
            out = Path(tmp) / f"bench-{done}.json"
            proc = _tracer("bench", "interrupt", "--host", server["host"], "--model", model, "--client", "http",
                           "--warmup", "0", "--iterations", str(batch), "--interrupt-after-ms", str(interrupt_after_ms),
                           "--request-timeout", str(request_timeout_s), "--json", str(out),
                           timeout=batch * (request_timeout_s + 5) + 60)
            result = json.loads(out.read_text()) if out.exists() else {"iterations": []}
            done += len(result["iterations"])
            if proc.returncode == 11:  # a stall: where, and a fresh server to go on with
                stalls.append(done + 1)
                done += 1
                _tracer("testbed", "down", "--ollama", version, timeout=120)
                server = _server(version)
            elif proc.returncode != 0:
                raise SystemExit(f"the bench failed on {version} (exit {proc.returncode}): {proc.stderr[-500:]}")
    return {"version": version, "interrupts": done, "stalls": len(stalls), "stalled_at": stalls,
            "seconds": round(time.monotonic() - started, 1)}


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--versions", default="0.13.5,0.34.4")
    parser.add_argument("--interrupts", type=int, default=200)
    parser.add_argument("--budget-s", type=float, default=900, help="per version")
    parser.add_argument("--model", default="tracer-llama:test")
    parser.add_argument("--interrupt-after-ms", type=float, default=200)
    parser.add_argument("--request-timeout", type=float, default=10)
    args = parser.parse_args()
    rows = [measure(v, interrupts=args.interrupts, budget_s=args.budget_s, model=args.model,
                    interrupt_after_ms=args.interrupt_after_ms, request_timeout_s=args.request_timeout)
            for v in args.versions.split(",")]
    print(f"{'version':>9} {'interrupts':>10} {'stalls':>6}  stalled after interrupt #   seconds")
    for row in rows:
        print(f"{row['version']:>9} {row['interrupts']:>10} {row['stalls']:>6}  "
              f"{', '.join(map(str, row['stalled_at'])) or '—':<24} {row['seconds']:>7}")
    print(json.dumps(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
