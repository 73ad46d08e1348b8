"""What observing costs: the median interrupt → first-token interval per configuration.

Interleaves, in one run, `tracer bench interrupt` against the testbed:

* ``plain``: the benchmark alone (spans go nowhere);
* ``capture``: under `tracer capture` with client spans only (receiver + auto-instrumentation);
* ``+log``: also the Ollama log collector;
* ``+ebpf``: also the eBPF collector (syscall tracepoints + catalogue uprobes).

The order of the arms rotates every round, so drift and noise hit every arm alike. It prints
each arm's median interval, its ratio to ``plain``, and each collector's own ratio against the
arm without it, plus the collectors' CPU time and the eBPF probe hits per request.

    python3 benchmarks/overhead.py --rounds 8 --iterations 8 [--model tracer-gemma3:test] [--json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ARMS: dict[str, list[str] | None] = {
    "plain": None,
    "capture": ["--no-ebpf", "--ollama-log", "/dev/null"],
    "+log": ["--no-ebpf"],
    "+ebpf": [],
}


def run_arm(arm: str, host: str, model: str, iterations: int, base: Path, index: int) -> tuple[list[float], dict]:
    out = base / f"{arm}-{index}.json"
    bench = [sys.executable, "-m", "tracer", "bench", "interrupt", "--host", host, "--model", model,
             "--iterations", str(iterations), "--json", str(out)]
    extra = ARMS[arm]
    directory = base / f"cap-{arm.strip('+')}-{index}"
    cmd = bench if extra is None else [sys.executable, "-m", "tracer", "capture", "-o", str(directory), "--force",
                                       "--ollama-host", host, *extra, "--", *bench]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(cmd, check=True, capture_output=True, text=True)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    values = [it["interrupt_to_first_token_ms"] for it in json.loads(out.read_text())["iterations"]
              if not it["warmup"]]
    info: dict = {"cpu_s": (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)}
    if extra is not None and (directory / "capture.json").exists():
        info["evidence"] = json.loads((directory / "capture.json").read_text()).get("evidence", {})
    return values, info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host", default=os.environ.get("OLLAMA_HOST", "http://127.0.0.1:11434"))
    parser.add_argument("--model", default="tracer-gemma3:test")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    arms = args.arms.split(",")
    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, float] = dict.fromkeys(arms, 0.0)
    hits: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = arms[round_index % len(arms):] + arms[:round_index % len(arms)]
            for arm in order:
                values, info = run_arm(arm, args.host, args.model, args.iterations, Path(tmp), round_index)
                samples[arm] += values
                cpu[arm] += info["cpu_s"]
                for request in info.get("evidence", {}).get("gguf_scans_per_request", []):
                    if arm == "+ebpf" and request.get("uprobe_hits") is not None:
                        hits.append(int(request["uprobe_hits"]))
            print(f"round {round_index + 1}/{args.rounds}: " + ", ".join(
                f"{arm} {statistics.median(samples[arm]):.2f} ms" for arm in arms), file=sys.stderr)
    medians = {arm: statistics.median(values) for arm, values in samples.items()}
    result = {
        "model": args.model, "intervals_per_arm": len(samples[arms[0]]), "median_ms": medians,
        "ratio_to_plain": {arm: medians[arm] / medians["plain"] for arm in arms if "plain" in medians},
        "collector_ratio": {arm: medians[arm] / medians[prev] for prev, arm in itertools.pairwise(arms)},
        "cpu_s_per_interval": {arm: cpu[arm] / max(1, len(samples[arm])) for arm in arms},
        "uprobe_hits_per_request_median": statistics.median(hits) if hits else None,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model}: {result['intervals_per_arm']} intervals per arm, interleaved")
    print(f"{'arm':<10}{'median ms':>12}{'vs plain':>10}{'vs previous':>13}{'CPU s/interval':>16}")
    for i, arm in enumerate(arms):
        vs_prev = f"{result['collector_ratio'][arm]:.4f}" if i else ""
        print(f"{arm:<10}{medians[arm]:>12.2f}{result['ratio_to_plain'].get(arm, 1.0):>10.4f}{vs_prev:>13}"
              f"{result['cpu_s_per_interval'][arm]:>16.3f}")
    print(f"eBPF uprobe hits per request (median): {result['uprobe_hits_per_request_median']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
