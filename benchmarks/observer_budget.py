"""The observer's event-cost budget: what each collector should add to one interrupt → first-token
interval, from how many events it causes there and what one event of each kind costs here.

Two parts in one run:

1. **Unit costs**, by microbenchmark on this machine, every arm interleaved with its baseline
   round by round (medians, with the spread of the rounds):

   * ``uprobe``: a C loop calling a non-inlined function, with no probe, with a uprobe that only
     counts, and with one that prints the capture's ``U`` line: µs per hit, and per printed hit;
   * ``tracepoint``: a C loop of ``write(2)`` to /dev/null, with no probe, with the capture's own
     syscall probe whose comm filter fails (what every other process on the machine pays), and
     with one that passes and prints the capture's ``W`` line;
   * ``stack sample``: a C busy loop under ``profile:hz:99`` with the capture's ``ustack(perf, 32)``
     printed: the work lost per sample;
   * ``py-spy sample``: a busy Python loop under ``py-spy record --nonblocking`` at 100 Hz, as the
     collector runs it: the work lost per sample, and py-spy's own CPU per sample;
   * ``span``: a GenAI-shaped span created and ended through the SDK's batch processor, exported
     over OTLP/gRPC to a receiver in another process (the capture's setup, 200 ms schedule): the
     client's CPU per span;
   * ``printed line``: bpftrace's own CPU per line it prints (the tracer's side, off the path).

2. **Counts, per measured interval of a real capture**, on each Ollama version: a capture of the
   interrupt benchmark (every collector on) with a second bpftrace beside it that counts every hit
   of the same probes, per millisecond: uprobe hits (the per-token ones too, which the capture
   prints once per request), syscall tracepoint firings whose filter passes and whose filter
   fails (any process, the client's own included), and profile ticks. Printed lines, stack
   samples, py-spy samples, spans and log lines come from the capture's own records. Counts are
   summed over each interval's window, [interrupt, first token].

The table multiplies the two: per collector, events per interval, expected added time per interval
(an upper bound: every event in the window is counted as if it were on the critical path, and on
two cores some run beside it), CPU per second of capture, and the total as a share of the median
interval. Given ``--ab FILE`` (the ``--json`` of benchmarks/overhead.py), it says whether the
measured ratio of ``all`` to ``plain`` and the budget agree (the budget's share inside the A/B's
95 % interval) or contradict each other.

    python3 benchmarks/observer_budget.py [--versions 0.13.5,0.34.4] [--iterations 8] [--rounds 5]
        [--json PATH] [--ab overhead.json]

Needs root (bpftrace, py-spy), gcc, and the testbed (``tracer testbed up``).
"""

from __future__ import annotations

import argparse
import bisect
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from engines import rotate  # the benchmarks rotate their arms alike
from overhead import STALLED, Stalled, heal  # the benchmarks share one way through the stall

MODEL = "tracer-llama:test"
COMM = "budget_probe"  # the microbenchmark binary's name, and its comm
PRINT_U = ('printf("U %llu %d %d 0 %llu %llu\\n", nsecs, pid, tid, '
           '*(uint64*)(reg("sp") + 8), *(uint64*)(reg("sp") + 16))')
PRINT_W = 'printf("W %llu %d %d %d %d %r\\n", nsecs, pid, tid, args->fd, args->count, buf(args->buf, 18))'
PRINT_P = 'printf("P %llu %d %d\\n%s\\n", nsecs, pid, tid, ustack(perf, 32))'
UPROBE_KINDS = frozenset("UGT")  # the capture's lines its uprobes print; the others are its tracepoints
CAPTURE_FILTER = '(comm == "ollama" || comm == "llama-server")'  # the capture's: never this benchmark's comm

C_SOURCE = r"""
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

__attribute__((noinline)) long probed(long x) { __asm__ volatile("" ::: "memory"); return x + 1; }

static long ns_of(clockid_t clock) {
    struct timespec t;
    clock_gettime(clock, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}
static long ns(void) { return ns_of(CLOCK_MONOTONIC); }
static long cpu_ns(void) { return ns_of(CLOCK_THREAD_CPUTIME_ID); }

/* budget_probe call|write|spin N: waits for a line on stdin (the probes are attached), then
   prints the loop's own CPU nanoseconds (call, write: N times; a probe's handler runs in the
   probed thread, so it is in them, and a busy machine's preemptions are not), or its iterations
   in N ms of wall time (spin: what a sampler's interruptions cost it). */
int main(int argc, char **argv) {
    char line[16];
    long n = atol(argv[2]), acc = 0, start;
    if (!fgets(line, sizeof line, stdin)) return 2;
    start = cpu_ns();
    if (!strcmp(argv[1], "call")) { for (long i = 0; i < n; i++) acc = probed(acc); }
    else if (!strcmp(argv[1], "write")) {
        int fd = open("/dev/null", O_WRONLY);
        for (long i = 0; i < n; i++) acc += write(fd, "x", 1);
    } else {
        long end = ns() + n * 1000000L, spins = 0;
        while (ns() < end) { for (int i = 0; i < 1000; i++) acc = probed(acc); spins++; }
        printf("%ld\n", spins);
        return 0;
    }
    printf("%ld\n", cpu_ns() - start);
    return acc < 0;
}
"""

PY_SPIN = r"""
import sys, time
sys.stdin.readline()
end, n = time.monotonic() + float(sys.argv[1]), 0
while time.monotonic() < end:
    for _ in range(1000):
        n += 1
print(n)
"""

SPAN_CLIENT = r"""
import os, sys, time
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor
from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter
n, endpoint = int(sys.argv[1]), sys.argv[2]
provider = None
if endpoint != "none":
    provider = TracerProvider()
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=True),
                                                   schedule_delay_millis=200))
tracer = (provider or trace.NoOpTracerProvider()).get_tracer("budget")
attributes = {"gen_ai.provider.name": "ollama", "gen_ai.operation.name": "text_completion",
              "gen_ai.request.model": "tracer-llama:test", "gen_ai.request.stream": True,
              "server.address": "127.0.0.1", "server.port": 11434, "thread.id": 1,
              "tracer.request_written_ns": 1, "tracer.response_start_ns": 2, "tracer.first_token_ns": 3,
              "gen_ai.usage.input_tokens": 12, "gen_ai.usage.output_tokens": 4, "tracer.local_port": 40000}
start = time.process_time()
for i in range(n):
    span = tracer.start_span("text_completion tracer-llama:test", attributes=attributes)
    time.sleep(0.0005)  # a request's pace: the batch thread exports while the caller works
    span.end()
if provider is not None:
    provider.force_flush()
cpu = time.process_time() - start  # the sleeps cost no CPU
print(cpu)
"""


# -- running things ------------------------------------------------------------------------------------------

class Bpftrace:
    """bpftrace running a script, its output in a file (read as fast as it comes, as the capture's
    reader does: a full pipe would make it drop events), started once its BEGIN printed READY."""

    def __init__(self, script: str, env: dict[str, str] | None = None, ready_timeout_s: float = 60.0) -> None:
        self._out = tempfile.NamedTemporaryFile("w+", prefix="bpftrace-", suffix=".txt")  # noqa: SIM115
        self.proc = subprocess.Popen(["bpftrace", "-B", "line", "-e", 'BEGIN { printf("READY\\n"); } ' + script],
                                     stdout=self._out, stderr=subprocess.PIPE, text=True,
                                     env={**os.environ, "BPFTRACE_NO_USER_SYMBOLS": "1", **(env or {})})
        deadline = time.monotonic() + ready_timeout_s
        while "READY" not in Path(self._out.name).read_text():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.proc.kill()
                _, err = self.proc.communicate()
                raise SystemExit(f"observer_budget: bpftrace did not start: {err[-800:]}")
            time.sleep(0.05)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, wake: Callable[[], object] | None = None) -> str:
        """SIGINT (it prints its maps); everything it printed. bpftrace 0.17 idle in epoll_wait
        after a burst of printed events may not see the signal until another event comes:
        ``wake`` makes one (a hit of its probe), and a bpftrace that still runs is killed."""
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.communicate(timeout=5)
        except subprocess.TimeoutExpired:
            if wake is not None:
                wake()
            try:
                self.proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.communicate()
        text = Path(self._out.name).read_text()
        self._out.close()
        return text


def _run_loop(binary: Path, mode: str, n: int) -> float:
    proc = subprocess.run([str(binary), mode, str(n)], input="go\n", capture_output=True, text=True, check=True)
    return float(proc.stdout.strip())


def _interleaved(arms: dict[str, Callable[[], float]], rounds: int) -> dict[str, list[float]]:
    """Each arm once per round, the order rotating: their values by arm."""
    values: dict[str, list[float]] = {name: [] for name in arms}
    for r in range(rounds):
        for name in rotate(list(arms), r):
            values[name].append(arms[name]())
    return values


def _spread(values: list[float]) -> list[float]:
    return [round(min(values), 3), round(max(values), 3)]


# -- part 1: unit costs ---------------------------------------------------------------------------------------

def unit_costs(rounds: int, work: Path) -> dict[str, Any]:
    binary = work / COMM
    (work / "probe.c").write_text(C_SOURCE)
    subprocess.run(["gcc", "-O2", "-o", str(binary), str(work / "probe.c")], check=True)
    costs: dict[str, Any] = {}

    calls = 100_000
    def with_script(script: str, mode: str, n: int) -> Callable[[], float]:
        def arm() -> float:
            probe = Bpftrace(script)
            try:
                return _run_loop(binary, mode, n)
            finally:
                probe.stop(wake=lambda: _run_loop(binary, mode, 1))
        return arm

    print("unit costs: uprobe hits ...", file=sys.stderr, flush=True)
    u = _interleaved({"none": lambda: _run_loop(binary, "call", calls),
                      "count": with_script(f"uprobe:{binary}:probed {{ @n = count(); }}", "call", calls),
                      "print": with_script(f"uprobe:{binary}:probed /comm == \"{COMM}\"/ {{ {PRINT_U}; }}",
                                           "call", calls)}, rounds)
    costs["uprobe_hit_us"] = _per_event(u["count"], u["none"], calls)
    costs["uprobe_printed_us"] = _per_event(u["print"], u["none"], calls)

    print("unit costs: syscall tracepoints ...", file=sys.stderr, flush=True)
    writes = 300_000
    enter_write = "tracepoint:syscalls:sys_enter_write"
    t = _interleaved({"none": lambda: _run_loop(binary, "write", writes),
                      "filtered": with_script(f"{enter_write} /{CAPTURE_FILTER}/ {{ @n = count(); }}", "write", writes),
                      "print": with_script(f"{enter_write} /comm == \"{COMM}\"/ {{ {PRINT_W}; }}", "write", writes)},
                     rounds)
    costs["tracepoint_filtered_us"] = _per_event(t["filtered"], t["none"], writes)
    costs["tracepoint_printed_us"] = _per_event(t["print"], t["none"], writes)

    print("unit costs: stack samples ...", file=sys.stderr, flush=True)
    spin_ms = 3000
    def spin_with(script: str | None) -> Callable[[], float]:
        def arm() -> float:
            probe = Bpftrace(script) if script else None
            try:
                return _run_loop(binary, "spin", spin_ms)
            finally:
                if probe is not None:
                    probe.stop(wake=lambda: _run_loop(binary, "spin", 20))
        return arm
    # The capture's probe (samples counted in bpftrace maps, printed per flush) against the one it
    # replaced (a printf per sample): the same busy loop, interleaved.
    from ollama_tracer.collectors import ebpf_profile

    counted = ebpf_profile.probe(99, f'comm == "{COMM}"') + f" END {{ {ebpf_profile.END}}}"
    s = _interleaved({"none": spin_with(None), "counted": spin_with(counted),
                      "printed": spin_with(f"profile:hz:99 /comm == \"{COMM}\"/ {{ {PRINT_P}; }}")}, rounds)
    for arm, key in (("counted", "stack_sample_us"), ("printed", "stack_sample_printed_us")):
        lost = 1 - statistics.median(s[arm]) / statistics.median(s["none"])
        costs[key] = {"median": round(lost * 1e6 / 99, 2), "lost_share": round(lost, 5), "rounds": rounds}

    print("unit costs: py-spy samples ...", file=sys.stderr, flush=True)
    costs["pyspy_sample_us"] = _pyspy_cost(rounds, work)

    print("unit costs: spans ...", file=sys.stderr, flush=True)
    costs["span_us"] = _span_cost(rounds, work)

    print("unit costs: bpftrace's CPU per printed line ...", file=sys.stderr, flush=True)
    per_line = []
    for _ in range(rounds):
        probe = Bpftrace(f"uprobe:{binary}:probed /comm == \"{COMM}\"/ {{ {PRINT_U}; }}")
        before = _cpu_of(probe.pid)
        _run_loop(binary, "call", calls)
        time.sleep(0.5)  # its reader drains the buffer
        per_line.append((_cpu_of(probe.pid) - before) * 1e6 / calls)
        probe.stop(wake=lambda: _run_loop(binary, "call", 1))
    costs["bpftrace_cpu_per_line_us"] = {"median": round(statistics.median(per_line), 3), "range": _spread(per_line),
                                         "rounds": rounds}
    return costs


def _cpu_of(pid: int) -> float:
    """A process's CPU seconds so far (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _per_event(arm: list[float], none: list[float], n: int) -> dict[str, Any]:
    """µs per event: the median of the paired round differences (ns of the loop) over ``n``."""
    paired = [(a - b) / n / 1000 for a, b in zip(arm, none, strict=True)]
    return {"median": round(statistics.median(paired), 3), "range": _spread(paired), "rounds": len(paired)}


def _pyspy_cost(rounds: int, work: Path) -> dict[str, Any]:
    """A busy Python loop alone and under py-spy (the collector's flags), paired by round: the work
    lost per sample, and py-spy's own CPU per sample (off the loop's path: it never stops it)."""
    pyspy = shutil.which("py-spy")
    if pyspy is None:
        return {"skipped": "py-spy is not installed"}
    script = work / "spin.py"
    script.write_text(PY_SPIN)
    seconds, rate = 3.0, 100

    def spin(sampled: bool) -> tuple[int, float]:
        loop = subprocess.Popen([sys.executable, str(script), str(seconds)], stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, text=True)
        sampler = None
        if sampled:
            sampler = subprocess.Popen([pyspy, "record", "--nonblocking", "--idle", "--nolineno", "--rate", str(rate),
                                        "--format", "raw", "-o", str(work / "pyspy.txt"), "--pid", str(loop.pid)],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # attached and sampling
        before = _cpu_of(sampler.pid) if sampler else 0.0
        out, _ = loop.communicate("go\n", timeout=60)
        cpu = _cpu_of(sampler.pid) - before if sampler else 0.0
        if sampler is not None:
            sampler.send_signal(signal.SIGINT)
            sampler.wait(timeout=30)
        return int(out.strip()), cpu

    shares, cpu_per_sample = [], []
    for _ in range(rounds):
        alone, _ = spin(False)
        sampled, cpu = spin(True)
        shares.append(1 - sampled / alone)
        cpu_per_sample.append(cpu * 1e6 / (seconds * rate))
    share = statistics.median(shares)
    return {"median": round(share * 1e6 / rate, 2), "lost_share": round(share, 5), "range_share": _spread(shares),
            "pyspy_cpu_us_per_sample": round(statistics.median(cpu_per_sample), 1), "rounds": rounds}


def _span_cost(rounds: int, work: Path) -> dict[str, Any]:
    from ollama_tracer.collectors.otlp_receiver import OtlpReceiver

    script = work / "spans.py"
    script.write_text(SPAN_CLIENT)
    n = 2000
    with OtlpReceiver() as receiver:
        values = _interleaved({
            "none": lambda: float(subprocess.run([sys.executable, str(script), str(n), "none"], capture_output=True,
                                                 text=True, check=True).stdout),
            "export": lambda: float(subprocess.run([sys.executable, str(script), str(n), receiver.grpc_endpoint],
                                                   capture_output=True, text=True, check=True).stdout)}, rounds)
    paired = [(a - b) * 1e6 / n for a, b in zip(values["export"], values["none"], strict=True)]
    return {"median": round(statistics.median(paired), 1), "range": _spread(paired), "rounds": rounds}


# -- part 2: counts per interval -------------------------------------------------------------------------------

PROBE_LINE = re.compile(r"^(uprobe:\S+|tracepoint:\S+|profile:hz:\d+)\s+(/.*/\s*)?\{")
COMM_FILTER = re.compile(r'comm == "[^"]+"(?: \|\| comm == "[^"]+")*')
PRINTED_KIND = re.compile(r'printf\("([A-Z]) %llu %d %d (\d+ )?')


def counting_script(capture_script: str, probe_index: dict[str, str]) -> tuple[str, dict[int, str]]:
    """The capture's probes, each counting its hits per millisecond (no filter but the comm's, no
    per-token de-duplication): uprobes in @u[index, ms], syscall tracepoints in @t (their filter
    passed) and @o (failed: another process), profile ticks in @p / @q. And the uprobes' names
    (``probe_index``: the capture's, of its U lines; its goroutine probes print G and T)."""
    names: dict[int, str] = {}
    out: list[str] = []
    seen_tracepoints: set[str] = set()
    found = COMM_FILTER.search(capture_script)
    comms = f"({found.group(0)})" if found else CAPTURE_FILTER  # its own (a versioned binary is its comm)
    for line in capture_script.splitlines():
        match = PROBE_LINE.match(line)
        if not match:
            continue
        probe = match.group(1)
        if probe.startswith("uprobe:"):
            index = len(names)
            printed = PRINTED_KIND.search(line)
            kind, number = (printed.group(1), (printed.group(2) or "").strip()) if printed else ("?", "")
            names[index] = probe_index.get(number, number) if kind == "U" else f"goroutine probe {kind}"
            out.append(f"{probe} {{ @u[{index}, nsecs / 1000000] = count(); }}")
        elif probe.startswith("tracepoint:") and probe not in seen_tracepoints:
            seen_tracepoints.add(probe)
            number = len(seen_tracepoints)  # an integer key: a string one is 64 bytes in every entry
            out.append(f"{probe} {{ if ({comms}) {{ @t[{number}, nsecs / 1000000] = count(); }} "
                       f"else {{ @o[{number}, nsecs / 1000000] = count(); }} }}")
        elif probe.startswith("profile:"):
            out.append(f"{probe} {{ if ({comms}) {{ @p[nsecs / 1000000] = count(); }} "
                       f"else {{ @q[nsecs / 1000000] = count(); }} }}")
    return "\n".join(out) + "\n", names


MAP_LINE = re.compile(r"^@(\w)\[(?:(\d+), )?(\d+)\]: (\d+)$")


def parse_counts(text: str) -> dict[str, dict[str, dict[int, int]]]:
    """bpftrace's printed maps: map letter → key → {ms: count}."""
    out: dict[str, dict[str, dict[int, int]]] = defaultdict(lambda: defaultdict(dict))
    for line in text.splitlines():
        match = MAP_LINE.match(line.strip())
        if match:
            letter, key, ms, count = match.groups()
            out[letter][key or ""][int(ms)] = int(count)
    return out


def _in_windows(buckets: dict[int, int], windows: list[tuple[int, int]]) -> list[int]:
    """Per window (monotonic ms, inclusive), the sum of the buckets in it."""
    return [sum(c for ms, c in buckets.items() if a <= ms <= b) for a, b in windows]


def count_events(host: str, version: str, iterations: int, work: Path) -> dict[str, Any]:
    """:func:`count_events_once`, once more after Ollama's interrupt stall (the server restarted)."""
    try:
        return count_events_once(host, version, iterations, work)
    except Stalled as stall:
        print(f"counts on {version}: Ollama stalled ({stall}); restarting it and counting again",
              file=sys.stderr, flush=True)
        heal(host)
        return count_events_once(host, version, iterations, work)


def count_events_once(host: str, version: str, iterations: int, work: Path) -> dict[str, Any]:
    """A capture with a counting bpftrace beside it: events per measured interval, per kind."""
    base = [sys.executable, "-m", "ollama_tracer"]
    bench = [*base, "bench", "interrupt", "--host", host, "--model", MODEL, "--interrupt-after-ms", "300",
             "--request-timeout", "60"]
    print(f"counts on {version}: a short capture for its probe script ...", file=sys.stderr, flush=True)
    first = work / f"script-{version}"
    proc = subprocess.run([*base, "capture", "-o", str(first), "--force", "--ollama-host", host, "--",
                           *bench, "--iterations", "1"], capture_output=True, text=True, timeout=900, check=False)
    if proc.returncode == STALLED:
        raise Stalled(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        raise SystemExit(f"observer_budget: the first capture on {version} failed: {proc.stderr[-800:]}")
    meta = json.loads((first / "raw" / "ebpf_meta.json").read_text())
    script, names = counting_script((first / "raw" / "ebpf_script.bt").read_text(), meta.get("probe_index") or {})
    counter = Bpftrace(script, env={"BPFTRACE_MAP_KEYS_MAX": "200000"})
    out = work / f"capture-{version}"
    print(f"counts on {version}: the capture ({iterations} iterations) with every hit counted ...",
          file=sys.stderr, flush=True)
    offset_ns = time.time_ns() - time.monotonic_ns()  # epoch = monotonic + offset (bpftrace's nsecs is monotonic)
    started = time.monotonic()
    proc = subprocess.run([*base, "capture", "-o", str(out), "--force", "--ollama-host", host, "--",
                           *bench, "--iterations", str(iterations)], capture_output=True, text=True, timeout=1800)
    seconds = time.monotonic() - started
    text = counter.stop()
    if proc.returncode == STALLED:
        raise Stalled(proc.stderr.strip().splitlines()[-1])
    if proc.returncode != 0:
        raise SystemExit(f"observer_budget: the capture on {version} failed (exit {proc.returncode}): "
                         f"{proc.stderr[-800:]}")
    counts = parse_counts(text)
    if not counts:
        raise SystemExit(f"observer_budget: the counting bpftrace printed no maps on {version}: {text[-400:]}")
    attribution = json.loads((out / "attribution.json").read_text())
    intervals = [iv for iv in attribution["intervals"] if not iv["warmup"] and iv["kind"] == "interrupt"]
    windows_ns = [(int(iv["start_ns"]), int(iv["end_ns"])) for iv in intervals]
    windows = [((a - offset_ns) // 1_000_000, (b - offset_ns) // 1_000_000) for a, b in windows_ns]
    per: dict[str, list[int]] = {}
    per["uprobe hits"] = _sum_maps(counts["u"], windows)
    per["tracepoint firings (filter passed)"] = _sum_maps(counts["t"], windows)
    per["tracepoint firings (filter failed)"] = _sum_maps(counts["o"], windows)
    per["profile ticks (ours)"] = _sum_maps({"": counts["p"].get("", {})}, windows)
    per["profile ticks (others)"] = _sum_maps({"": counts["q"].get("", {})}, windows)
    records = _recorded(out, windows_ns)
    per.update(records)
    by_probe = {names[int(k)]: sum(_in_windows(b, windows)) / max(1, len(windows)) for k, b in counts["u"].items()}
    return {"version": version, "intervals": len(intervals), "capture_s": round(seconds, 1),
            "median_interval_ms": (round(statistics.median(iv["duration_ms"] for iv in intervals), 2)
                                   if intervals else None),
            "per_interval": {k: (round(statistics.mean(v), 2) if v else 0.0) for k, v in per.items()},
            "totals": {k: sum(v) for k, v in per.items()},
            "uprobe_hits_by_function": dict(sorted(by_probe.items(), key=lambda kv: -kv[1])[:12]),
            "capture": str(out)}


def _sum_maps(maps: dict[str, dict[int, int]], windows: list[tuple[int, int]]) -> list[int]:
    if not maps:
        return [0] * len(windows)
    return [sum(x) for x in zip(*(_in_windows(b, windows) for b in maps.values()), strict=True)]


def _recorded(out: Path, windows: list[tuple[int, int]]) -> dict[str, list[int]]:
    """Per window (epoch ns): what the capture itself recorded in it."""
    from ollama_tracer.capture import directory as capture_directory
    from ollama_tracer.collectors.ebpf_events import EbpfRecords
    from ollama_tracer.collectors.ollama_log import LogRecords
    from ollama_tracer.collectors.otlp import ClientSpans
    from ollama_tracer.collectors.pyspy import PythonStacks

    meta = capture_directory.load_capture_meta(out)
    records = capture_directory.load_records(out, meta)

    def count(times: Iterable[int]) -> list[int]:
        ordered = sorted(times)
        return [bisect.bisect_right(ordered, b) - bisect.bisect_left(ordered, a) for a, b in windows]

    result: dict[str, list[int]] = {}
    ebpf = records.get(EbpfRecords)
    if ebpf is not None:
        result["printed lines (uprobes)"] = count(e.time_ns for e in ebpf.events if e.kind in UPROBE_KINDS)
        result["printed lines (tracepoints)"] = count(e.time_ns for e in ebpf.events if e.kind not in UPROBE_KINDS)
        result["stack samples"] = count(s.time_ns for s in ebpf.native_stacks)
    stacks = records.get(PythonStacks)
    if stacks is not None:  # slices of unchanged stacks: their overlap with a window × the rate
        result["py-spy samples"] = [round(sum(max(0, min(s.end_ns, b) - max(s.start_ns, a)) for s in stacks.slices)
                                          * stacks.rate_hz / 1e9) for a, b in windows]
    spans = records.get(ClientSpans)
    if spans is not None:
        result["spans exported"] = count(int(s["endTimeUnixNano"]) for s in records.spans)
    log = records.get(LogRecords)
    if log is not None:
        result["log lines"] = count(e.time_ns for e in log.events)
    return result


# -- the budget -----------------------------------------------------------------------------------------------

def budget(units: dict[str, Any], counts: dict[str, Any]) -> list[dict[str, Any]]:
    """Per collector: events per interval, expected µs per interval, and the share of the median."""
    u = {k: (v.get("median", 0.0) if isinstance(v, dict) else 0.0) for k, v in units.items()}
    per = counts["per_interval"]
    printed_u, printed_t = per.get("printed lines (uprobes)", 0.0), per.get("printed lines (tracepoints)", 0.0)
    # py-spy never stops the client (--nonblocking): a loss its microbenchmark cannot tell from 0 is 0.
    pyspy_us = max(0.0, u["pyspy_sample_us"])
    rows = [
        ("eBPF probes (uprobes + syscall tracepoints)",
         per["uprobe hits"] + per["tracepoint firings (filter passed)"] + per["tracepoint firings (filter failed)"],
         per["uprobe hits"] * u["uprobe_hit_us"]
         + (per["tracepoint firings (filter passed)"] + per["tracepoint firings (filter failed)"])
         * u["tracepoint_filtered_us"]
         + printed_u * max(0.0, u["uprobe_printed_us"] - u["uprobe_hit_us"])
         + printed_t * max(0.0, u["tracepoint_printed_us"] - u["tracepoint_filtered_us"])),
        ("native stacks (profile 99 Hz)", per.get("stack samples", 0.0),
         per.get("stack samples", 0.0) * u["stack_sample_us"]),
        ("py-spy (100 Hz, non-blocking)", per.get("py-spy samples", 0.0),
         per.get("py-spy samples", 0.0) * pyspy_us),
        ("client spans (OTLP)", per.get("spans exported", 0.0), per.get("spans exported", 0.0) * u["span_us"]),
        ("Ollama log (read by the tracer)", per.get("log lines", 0.0), 0.0),
    ]
    median_us = (counts["median_interval_ms"] or 0) * 1000
    # CPU per second of capture off the path: bpftrace reading what it printed, py-spy sampling.
    seconds = counts["capture_s"] or 1.0
    totals = counts["totals"]
    lines = totals.get("printed lines (uprobes)", 0) + totals.get("printed lines (tracepoints)", 0)
    pyspy_cpu = units.get("pyspy_sample_us", {}).get("pyspy_cpu_us_per_sample", 0.0)
    off_path_ms_per_s = {0: lines * u["bpftrace_cpu_per_line_us"] / seconds / 1000, 2: pyspy_cpu * 100 / 1000}
    return [{"collector": name, "events": round(events, 1), "added_us": round(added, 1),
             "share": round(added / median_us, 5) if median_us else None,
             "cpu_ms_per_s": round(off_path_ms_per_s.get(index, 0.0), 2)}
            for index, (name, events, added) in enumerate(rows)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--versions", default="0.13.5,0.34.4")
    parser.add_argument("--iterations", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds of each microbenchmark")
    parser.add_argument("--json", type=Path)
    parser.add_argument("--ab", type=Path, help="benchmarks/overhead.py --json output to compare with")
    parser.add_argument("--units-only", action="store_true", help="the unit costs alone (no testbed needed)")
    parser.add_argument("--units", type=Path, help="reuse the unit costs of an earlier run's --json")
    args = parser.parse_args()
    # A background job of a shell script starts with SIGINT ignored, and its children inherit
    # that: bpftrace would never stop to print its maps, nor py-spy to write its file. A handler
    # here is reset to the default in every child at exec.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if os.geteuid() != 0:
        raise SystemExit("observer_budget: needs root (bpftrace and py-spy attach to other processes).")
    work = Path(tempfile.mkdtemp(prefix="observer-budget-"))
    units = json.loads(args.units.read_text())["units"] if args.units else unit_costs(args.rounds, work)
    print("\nunit costs on this machine (median of paired rounds):")
    for key, value in units.items():
        print(f"  {key:28s} {json.dumps(value)}")
    result: dict[str, Any] = {"units": units, "versions": {}}
    if not args.units_only:
        proc = subprocess.run([sys.executable, "-m", "ollama_tracer", "testbed", "up", "--ollama", args.versions,
                               "--json"], capture_output=True, text=True, timeout=3000)
        if proc.returncode != 0:
            raise SystemExit(f"observer_budget: `tracer testbed up` failed: {proc.stderr[-600:]}")
        servers = {s["version"]: s["host"] for s in json.loads(proc.stdout)["servers"] if s["layout"] == "plain"}
        for version in args.versions.split(","):
            counts = count_events(servers[version], version, args.iterations, work)
            rows = budget(units, counts)
            result["versions"][version] = {"counts": counts, "budget": rows}
            _print_budget(version, counts, rows, args.ab)
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def _print_budget(version: str, counts: dict[str, Any], rows: list[dict[str, Any]], ab: Path | None) -> None:
    print(f"\nOllama {version}: {counts['intervals']} measured intervals, median {counts['median_interval_ms']} ms; "
          f"{counts['capture_s']} s of capture")
    print("  events per interval: " + ", ".join(f"{k} {v}" for k, v in counts["per_interval"].items()))
    print("  uprobe hits per interval, by function: "
          + ", ".join(f"{k} {v:.1f}" for k, v in counts["uprobe_hits_by_function"].items()))
    print(f"  {'collector':46s} {'events':>8s} {'added µs':>10s} {'share':>8s} {'off-path CPU ms/s':>18s}")
    total = 0.0
    for row in rows:
        total += row["added_us"]
        share = f"{100 * row['share']:.2f} %" if row["share"] is not None else "-"
        print(f"  {row['collector']:46s} {row['events']:8.1f} {row['added_us']:10.1f} {share:>8s} "
              f"{row['cpu_ms_per_s']:18.2f}")
    median_us = (counts["median_interval_ms"] or 0) * 1000
    share_total = total / median_us if median_us else None
    print(f"  {'all':46s} {'':8s} {total:10.1f} {100 * share_total:7.2f} %" if share_total is not None else "")
    if ab is not None and ab.exists() and share_total is not None:
        data = json.loads(ab.read_text())
        interval = (data.get("ratio_to_baseline_ci95") or {}).get("all")
        if interval:
            low, high = interval
            verdict = "agree" if low <= 1 + share_total <= high else "CONTRADICT"
            print(f"  the A/B's all/plain 95 % interval [{low}, {high}] and the budget's "
                  f"{1 + share_total:.4f}: {verdict}")


if __name__ == "__main__":
    sys.exit(main())
