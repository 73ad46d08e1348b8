"""What observing costs: the median interrupt → first-token interval per configuration.

Interleaves, in one run, `tracer bench interrupt` against the testbed:

* ``plain``: the benchmark alone (spans go nowhere);
* ``capture``: under `tracer capture` with client spans only (receiver + auto-instrumentation);
* ``+log``, ``+syscalls`` (the eBPF collector's syscall tracepoints alone, ``--ebpf-layers
  syscall``), ``+ebpf`` (syscall tracepoints + catalogue uprobes), ``+pyspy`` (100 Hz), ``+nvml``
  (100 Hz): ``capture`` plus that one collector; ``+profile``: ``+ebpf`` plus the 99 Hz stack
  probe. Each one's cost is its median against its baseline arm (``capture``, or ``+ebpf``
  for ``+profile``);
* ``all``: every collector on, as `tracer capture` runs by default: the total cost.

An arm whose collector is not available here (``+nvml`` without a GPU) is left out, and said so.
The order of the arms rotates every round, so drift and noise hit every arm alike. It prints
each arm's median interval, its ratio to ``plain`` and to its baseline, and the CPU seconds per
interval of the whole arm (benchmark, tracer and collectors: bpftrace and py-spy are children).

    python3 benchmarks/overhead.py --rounds 8 --iterations 8 [--model tracer-gemma3:test] [--json]
    python3 benchmarks/overhead.py --backend llama-cpp-python --model tracer-llama:test --arms plain,capture,+ebpf
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

IN_PROCESS = "llama-cpp-python"  # the bench's backend that runs llama.cpp in its own process
TARGET_HALF_WIDTH = 0.01  # the resolution: a ratio known to ±1 %
OFF = ["--no-ebpf", "--ollama-log", "/dev/null", "--gpu-rate", "0", "--pyspy-rate", "0", "--profile-hz", "0"]


def _without(flags: list[str], *names: str) -> list[str]:
    """OFF minus the flags (and their values) that switch ``names`` off."""
    out, skip = [], False
    for i, flag in enumerate(flags):
        if skip:
            skip = False
            continue
        if flag in names:
            skip = i + 1 < len(flags) and not flags[i + 1].startswith("--")
            continue
        out.append(flag)
    return out


# arm -> (extra `tracer capture` flags or None for no capture, baseline arm)
ARMS: dict[str, tuple[list[str] | None, str]] = {
    "plain": (None, "plain"),
    "capture": (OFF, "plain"),
    "+log": (_without(OFF, "--ollama-log"), "capture"),
    "+syscalls": ([*_without(OFF, "--no-ebpf"), "--ebpf-layers", "syscall"], "capture"),  # tracepoints only
    "+ebpf": (_without(OFF, "--no-ebpf"), "capture"),
    "+profile": (_without(OFF, "--no-ebpf", "--profile-hz"), "+ebpf"),
    "+pyspy": (_without(OFF, "--pyspy-rate"), "capture"),
    "+nvml": (_without(OFF, "--gpu-rate"), "capture"),
    "all": ([], "plain"),
}


def nvml_available() -> tuple[bool, str]:
    from ollama_tracer.doctor_checks import check_nvml

    result = check_nvml()
    return result.ok, result.detail


def ratio_ci(values: list[float], baseline: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95 % percentile-bootstrap interval of median(values) / median(baseline)."""
    rng = random.Random(seed)
    ratios = sorted(statistics.median(rng.choices(values, k=len(values)))
                    / statistics.median(rng.choices(baseline, k=len(baseline))) for _ in range(resamples))
    return [round(ratios[int(0.025 * resamples)], 4), round(ratios[int(0.975 * resamples) - 1], 4)]


STALLED = 11  # `tracer bench` and `tracer capture`: Ollama accepted a request and sent nothing (the stall)


class Stalled(Exception):
    """Ollama's interrupt stall (README) ended an arm's run: the round is dropped, the server restarted."""


def heal(host: str) -> None:
    """Restart the testbed's server at ``host`` after the stall (it keeps its port)."""
    from urllib.request import urlopen

    with urlopen(f"{host}/api/version", timeout=10) as answer:  # the stall leaves /api/version answering
        version = json.loads(answer.read())["version"]
    # `testbed up` finds the stalled server (its models do not answer) and restarts it on its port.
    subprocess.run([sys.executable, "-m", "ollama_tracer", "testbed", "up", "--ollama", version],
                   capture_output=True, text=True, timeout=900, check=True)


def run_arm(arm: str, host: str, model: str, iterations: int, base: Path, index: int,
            backend: str = "ollama") -> tuple[list[float], dict]:
    out = base / f"{arm}-{index}.json"
    # llama-cpp-python runs in the bench's own process: no host, and the capture probes its libllama.
    where = [] if backend == IN_PROCESS else ["--host", host]
    bench = [sys.executable, "-m", "ollama_tracer", "bench", "interrupt", "--backend", backend, *where,
             "--model", model, "--iterations", str(iterations), "--json", str(out)]
    extra = ARMS[arm][0]
    directory = base / f"cap-{arm.strip('+')}-{index}"
    server = [] if backend == IN_PROCESS else ["--ollama-host", host]
    cmd = bench if extra is None else [sys.executable, "-m", "ollama_tracer", "capture", "-o", str(directory),
                                       "--force", *server, *extra, "--", *bench]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode == STALLED:
        raise Stalled(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "exit 11")
    if proc.returncode != 0:
        raise SystemExit(f"overhead: the {arm} arm failed (exit {proc.returncode}): {proc.stderr[-800:]}")
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
    parser.add_argument("--backend", default="ollama", choices=("ollama", "llama-server", IN_PROCESS),
                        help="the bench's engine (default ollama); llama-cpp-python: the in-process probes' cost")
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--arms", default=",".join(ARMS), help="comma-separated subset of " + ",".join(ARMS))
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    arms = [arm for arm in args.arms.split(",") if arm]
    unknown = [arm for arm in arms if arm not in ARMS]
    if unknown:
        parser.error(f"unknown arm {unknown[0]!r}; choose from {', '.join(ARMS)}")
    skipped = {}
    if "+nvml" in arms:
        ok, why = nvml_available()
        if not ok:
            arms.remove("+nvml")
            skipped["+nvml"] = why
            print(f"+nvml left out: {why}", file=sys.stderr)
    pending = list(arms)
    while pending:  # every arm needs its baseline in the same run, and that one its own
        base = ARMS[pending.pop()][1]
        if base not in arms:
            arms.insert(0, base)
            pending.append(base)
    arms = list(dict.fromkeys(arms))
    samples: dict[str, list[float]] = {arm: [] for arm in arms}
    cpu: dict[str, float] = dict.fromkeys(arms, 0.0)
    hits: list[int] = []
    dropped: list[int] = []
    with tempfile.TemporaryDirectory() as tmp:
        for round_index in range(args.rounds):
            order = arms[round_index % len(arms):] + arms[:round_index % len(arms)]
            try:
                done = {arm: run_arm(arm, args.host, args.model, args.iterations, Path(tmp), round_index,
                                     args.backend)
                        for arm in order}
            except Stalled as stall:  # every arm keeps the same rounds: this one is dropped for all
                dropped.append(round_index + 1)
                print(f"round {round_index + 1}/{args.rounds}: dropped, Ollama stalled ({stall}); restarting it",
                      file=sys.stderr)
                heal(args.host)
                continue
            for arm, (values, info) in done.items():
                samples[arm] += values
                cpu[arm] += info["cpu_s"]
                for request in info.get("evidence", {}).get("gguf_scans_per_request", []):
                    if arm == "+ebpf" and request.get("uprobe_hits") is not None:
                        hits.append(int(request["uprobe_hits"]))
            print(f"round {round_index + 1}/{args.rounds}, medians so far: " + ", ".join(
                f"{arm} {statistics.median(samples[arm]):.2f} ms" for arm in arms), file=sys.stderr)
    medians = {arm: statistics.median(values) for arm, values in samples.items()}
    ci = {arm: ratio_ci(samples[arm], samples[ARMS[arm][1]]) for arm in arms if ARMS[arm][1] != arm}
    # The half-width reached, and the intervals per arm a half-width of 1 % would take (it
    # shrinks as 1/sqrt(n)).
    half = {arm: (high - low) / 2 for arm, (low, high) in ci.items()}
    needed = {arm: math.ceil(len(samples[arm]) * (width / TARGET_HALF_WIDTH) ** 2) for arm, width in half.items()}
    result = {
        "model": args.model, "backend": args.backend, "rounds": args.rounds, "intervals_per_arm": len(samples[arms[0]]),
        "median_ms": medians,
        "ratio_to_plain": {arm: medians[arm] / medians["plain"] for arm in arms if "plain" in medians},
        "ratio_to_baseline": {arm: medians[arm] / medians[ARMS[arm][1]] for arm in arms},
        "ratio_to_baseline_ci95": ci,
        "half_width": half,
        "intervals_for_1pct_half_width": needed,
        "baseline": {arm: ARMS[arm][1] for arm in arms},
        "cpu_s_per_interval": {arm: cpu[arm] / max(1, len(samples[arm])) for arm in arms},
        "uprobe_hits_per_request_median": statistics.median(hits) if hits else None,
        "skipped": skipped,
        "rounds_dropped_for_the_stall": dropped,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{args.model} on {args.backend}: {result['intervals_per_arm']} intervals per arm, {args.rounds} rounds, "
          "interleaved")
    print(f"{'arm':<10}{'median ms':>12}{'vs plain':>10}{'vs baseline':>22}{'95 % CI':>18}{'CPU s/interval':>16}")
    for arm in arms:
        base = ARMS[arm][1]
        vs_base = f"{result['ratio_to_baseline'][arm]:.4f} ({base})" if base != arm else ""
        low_high = f"[{ci[arm][0]:.3f}, {ci[arm][1]:.3f}]" if arm in ci else ""
        print(f"{arm:<10}{medians[arm]:>12.2f}{result['ratio_to_plain'].get(arm, 1.0):>10.4f}{vs_base:>22}"
              f"{low_high:>18}{result['cpu_s_per_interval'][arm]:>16.3f}")
    print("95 % CI: bootstrap of median(arm) / median(baseline) over the intervals; a CI that holds 1.0 is "
          "a cost this machine's noise cannot tell from none.")
    for arm, width in half.items():
        reached = "reached" if width <= TARGET_HALF_WIDTH else f"would need about {needed[arm]} intervals per arm"
        print(f"{arm}: half-width {100 * width:.2f} % with {len(samples[arm])} intervals; 1 % {reached}")
    for arm, why in skipped.items():
        print(f"{arm}: not run ({why})")
    print(f"eBPF uprobe hits per request (median): {result['uprobe_hits_per_request_median']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
