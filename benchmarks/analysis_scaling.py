"""Does the analysis scale linearly with the capture? And how fast does the CLI start?

It records real captures of the interrupt benchmark (``tracer capture -- tracer bench interrupt``
against the testbed, every collector on) of 10, 100 and 1,000 intervals per engine (each Ollama
version, and llama-server alone), once (they are kept under ~/.cache/ollama-tracer/benchmarks/analysis/; ``--record``
records them again), then times ``tracer report`` on each, as table, JSON and HTML, each in its
own process, and prints the median time, the peak memory (maximum resident set) and the time per
interval, so that the growth is visible: linear analysis keeps the time per interval flat.

Targets (issue 18): a 1,000-interval capture reported (table and JSON) in ≤ 5 s, HTML in ≤ 10 s,
and the CLI itself (``tracer --help``) starting in ≤ 0.2 s, measured beside the interpreter's own
start (``python3 -c pass``), interleaved.

Ollama stalls after some interrupts (README: about one in a few hundred on both versions here),
and the bench then stops: such a capture holds the intervals before the stall, and the table says
how many. llama-server alone does not stall, so its 1,000-interval capture is whole.

    python3 benchmarks/analysis_scaling.py --versions llama-server,0.34.4,0.13.5 --sizes 10,100,1000
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

LLAMA_SERVER = "llama-server"
CACHE = Path.home() / ".cache" / "ollama-tracer" / "benchmarks" / "analysis"
TARGETS_S = {"table": 5.0, "json": 5.0, "html": 10.0}
CLI_TARGET_S = 0.2


def _tracer(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollama_tracer", *args], capture_output=True, text=True,
                          timeout=timeout, check=False)


def _host(engine: str, model: str) -> tuple[str, list[str]]:
    """The server's URL for ``engine`` (an Ollama version, or ``llama-server``: llama.cpp's server
    alone), and the bench's arguments for it."""
    if engine == LLAMA_SERVER:
        proc = _tracer("testbed", "up", "--llama-server", "--json", timeout=3600)
        if proc.returncode != 0:
            raise SystemExit(f"testbed up --llama-server failed: {proc.stderr.strip()[-500:]}")
        server = next(s for s in json.loads(proc.stdout)["llama_servers"] if s["model"] == model)
        return str(server["host"]), ["--backend", "llama-server"]
    proc = _tracer("testbed", "up", "--ollama", engine, "--json", timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"testbed up --ollama {engine} failed: {proc.stderr.strip()[-500:]}")
    return str(next(s for s in json.loads(proc.stdout)["servers"] if s["version"] == engine)["host"]), []


def _intervals(directory: Path) -> int:
    attribution = json.loads((directory / "attribution.json").read_text())
    return sum(1 for iv in attribution["intervals"] if not iv["warmup"])


def record(version: str, size: int, model: str, again: bool) -> Path:
    """A capture of ``size`` interrupts on ``version``, recorded now unless one is kept."""
    directory = CACHE / f"{version}-{model.replace(':', '_')}-{size}"
    if directory.exists() and (directory / "attribution.json").exists() and not again:
        return directory
    host, backend = _host(version, model)
    print(f"recording {size} interrupts on {version} ({model}) into {directory} ...", file=sys.stderr,
          flush=True)
    started = time.monotonic()
    proc = _tracer("capture", "-o", str(directory), "--force", "--ollama-host", host, "--",
                   sys.executable, "-m", "ollama_tracer", "bench", "interrupt", *backend, "--host", host,
                   "--model", model, "--iterations", str(size), "--interrupt-after-ms", "60",
                   "--request-timeout", "30", timeout=size * 20 + 300)
    # An interrupt stall of Ollama (exit 11) ends the bench early: the capture keeps what it had.
    if proc.returncode not in (0, 11) or not (directory / "attribution.json").exists():
        raise SystemExit(f"the capture of {size} on {version} failed (exit {proc.returncode}): {proc.stderr[-800:]}")
    print(f"  {_intervals(directory)} intervals in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return directory


def _timed(argv: list[str]) -> tuple[float, int]:
    """(wall seconds, peak resident KiB) of one process."""
    started = time.perf_counter()
    child = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(child.pid, 0)
    elapsed = time.perf_counter() - started
    child.returncode = os.waitstatus_to_exitcode(status)
    stderr = child.stderr.read().decode(errors="replace") if child.stderr else ""
    if child.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {child.returncode}: {stderr[-500:]}")
    return elapsed, usage.ru_maxrss


def report_times(directory: Path, runs: int) -> dict[str, dict[str, float]]:
    """Per format: the median seconds and the largest peak memory (MiB) over ``runs``, interleaved."""
    times: dict[str, list[float]] = {f: [] for f in TARGETS_S}
    peaks: dict[str, int] = dict.fromkeys(TARGETS_S, 0)
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(runs):
            for fmt in TARGETS_S:
                extra = ["-o", str(Path(tmp) / "report.html")] if fmt == "html" else []
                elapsed, peak = _timed([sys.executable, "-m", "ollama_tracer", "report", str(directory),
                                        "--format", fmt, *extra])
                times[fmt].append(elapsed)
                peaks[fmt] = max(peaks[fmt], peak)
    return {fmt: {"s": statistics.median(times[fmt]), "mib": peaks[fmt] / 1024} for fmt in TARGETS_S}


def cli_start(runs: int) -> dict[str, float]:
    """Median seconds of ``tracer --help`` and of the bare interpreter, interleaved."""
    bare, cli = [], []
    for _ in range(runs):
        bare.append(_timed([sys.executable, "-c", "pass"])[0])
        cli.append(_timed([sys.executable, "-m", "ollama_tracer", "--help"])[0])
    return {"python_s": statistics.median(bare), "tracer_help_s": statistics.median(cli)}


def _events(directory: Path) -> int:
    path = directory / "raw" / "ebpf_events.txt"
    if not path.exists():
        return 0
    with path.open("rb") as lines:
        return sum(1 for _ in lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--versions", default="llama-server,0.34.4,0.13.5",
                        help="Ollama versions, and llama-server (llama.cpp's server alone, which has no "
                             "interrupt stall: the one that reaches 1,000 intervals in one capture)")
    parser.add_argument("--sizes", default="10,100,1000", help="intervals per capture")
    parser.add_argument("--model", default="tracer-llama:test")
    parser.add_argument("--runs", type=int, default=3, help="report runs per format and capture (median)")
    parser.add_argument("--record", action="store_true", help="record the captures again")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = []
    for version in args.versions.split(","):
        for size in sizes:
            directory = record(version, size, args.model, args.record)
            measured = report_times(directory, args.runs)
            rows.append({"version": version, "size": size, "intervals": _intervals(directory),
                         "event_lines": _events(directory), **{f"{f}_s": m["s"] for f, m in measured.items()},
                         **{f"{f}_mib": m["mib"] for f, m in measured.items()}})
    start = cli_start(max(9, args.runs * 3))
    print(f"{'engine':>12} {'intervals':>9} {'eBPF lines':>10} {'table s':>8} {'json s':>7} {'html s':>7} "
          f"{'ms/interval (json)':>18} {'peak MiB':>8}")
    for row in rows:
        per = 1000 * row["json_s"] / max(1, row["intervals"])
        print(f"{row['version']:>12} {row['intervals']:>9} {row['event_lines']:>10} {row['table_s']:>8.2f} "
              f"{row['json_s']:>7.2f} {row['html_s']:>7.2f} {per:>18.2f} "
              f"{max(row['table_mib'], row['json_mib'], row['html_mib']):>8.0f}")
    for version in args.versions.split(","):
        mine = [r for r in rows if r["version"] == version]
        if len(mine) >= 2:
            small, large = mine[0], mine[-1]
            growth = (large["json_s"] / small["json_s"]) / (max(1, large["intervals"]) / max(1, small["intervals"]))
            more = large["intervals"] / max(1, small["intervals"])
            print(f"{version}: {small['intervals']} → {large['intervals']} intervals: json time × "
                  f"{large['json_s'] / small['json_s']:.1f} for × {more:.0f} the intervals "
                  f"(1.0 = linear; {growth:.2f} of linear, start-up included)")
        biggest = mine[-1] if mine else None
        if biggest is not None:
            verdicts = [f"{fmt} {biggest[f'{fmt}_s']:.2f} s (target ≤ {target:g} s: "
                        f"{'met' if biggest[f'{fmt}_s'] <= target else 'NOT met'})"
                        for fmt, target in TARGETS_S.items()]
            print(f"{version}, {biggest['intervals']} intervals: " + "; ".join(verdicts))
    print(f"CLI start: tracer --help {start['tracer_help_s']:.3f} s, python3 -c pass {start['python_s']:.3f} s "
          f"(target ≤ {CLI_TARGET_S} s: {'met' if start['tracer_help_s'] <= CLI_TARGET_S else 'NOT met'})")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "cli": start}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
