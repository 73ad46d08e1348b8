"""Ground truth for the attribution: delays and events this harness causes itself, and where the
attribution puts them, on each Ollama version of the testbed.

Each case causes one thing in one place and checks the phase it must land in:

* ``request path``: a loopback relay holds the client's request bytes for 40 ms → ``server.receive``
  grows by what the relay really added (timed from the client's "request written" to the relay's
  send, on one clock);
* ``response path``: the relay holds the first response bytes for 40 ms → ``server.stream`` grows
  by what it added (the relay's receipt of them → their arrival at the client);
* ``prefill``: a second prompt about 700 tokens longer → ``runner.prefill`` grows by what the
  runner itself says it spent on the extra tokens (``prompt_eval_duration`` of the answered
  requests: the per-token cost measured, not assumed; the one case whose truth is the server's
  own clock, not ours);
* ``reload (options)``: the second request asks for another ``num_ctx`` → every interval has
  ``server.model_load`` with the reason "reload", and the diagnosis names it;
* ``cold load``: the interrupted request has ``keep_alive: 0`` → every interval has
  ``server.model_load`` with the reason "cold load".

Target: every timed case within 1 ms or 5 % (the larger), or three times the phase's own noise on
a loaded machine (printed as the bound). Prints one table per version.

    python3 benchmarks/accuracy.py --versions 0.13.5,0.34.4 [--record]

``--record`` writes the summary every report's header quotes (``tracer/accuracy.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from ollama_tracer.testbed.relay import REQUEST, RESPONSE, delay_bound_ms, measure_injected_delay

REPO = Path(__file__).resolve().parent.parent
MODEL = "tracer-llama:test"
# ~700 tokens more, different in every iteration from its first token: llama-server's prompt
# cache (v0.34) would otherwise serve it from the second iteration on.
LONG_PROMPT = "{iteration} " + " ".join(["the quick brown fox jumps over the lazy dog"] * 80)


def _tracer(*args: str, timeout: float = 900, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ollama_tracer", *args], capture_output=True, text=True,
                          timeout=timeout, check=False, cwd=REPO, env=dict(os.environ, **(env or {})))


def _server(version: str) -> dict[str, Any]:
    proc = _tracer("testbed", "up", "--ollama", version, "--json", timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"testbed up --ollama {version} failed: {proc.stderr.strip()[-500:]}")
    return next(s for s in json.loads(proc.stdout)["servers"] if s["version"] == version)


def _capture(server: dict[str, Any], out: Path, *bench: str, host: str | None = None,
             iterations: int = 8) -> dict[str, Any]:
    """A capture of `tracer bench interrupt`, run once more on a fresh server after a stall."""
    args = ["capture", "-o", str(out), "--force", "--ollama-host", server["host"], "--", sys.executable, "-m",
            "ollama_tracer", "bench", "interrupt", "--host", host or server["host"], "--model", MODEL,
            "--iterations", str(iterations), "--interrupt-after-ms", "300", "--request-timeout", "30", *bench]
    proc = _tracer(*args)
    if proc.returncode == 11:  # the interrupt stall (docs/interrupt-stall.md): a fresh server, once
        _server(server["version"])
        proc = _tracer(*args)
    if proc.returncode != 0:
        raise RuntimeError(f"the capture failed (exit {proc.returncode}): {proc.stderr.strip()[-400:]}")
    return dict(json.loads((out / "attribution.json").read_text()))


def _measured(attribution: dict[str, Any]) -> list[dict[str, Any]]:
    return [iv for iv in attribution["intervals"] if not iv["warmup"]]


def _phase_ms(interval: dict[str, Any], name: str) -> float:
    return sum(p["duration_ms"] for p in interval["phases"] if p["name"] == name)


def _prompt_eval_ms(out: Path) -> list[float]:
    """The runner's own prefill time of each answered second-stage request (spans.jsonl)."""
    values = []
    for line in (out / "spans.jsonl").read_text().splitlines():
        attributes = json.loads(line).get("attributes", {})
        if attributes.get("ollama.prompt_eval_duration") and not attributes.get("tracer.cancelled"):
            values.append(attributes["ollama.prompt_eval_duration"] / 1e6)
    return values


def relay_case(server: dict[str, Any], work: Path, direction: str, phase: str) -> dict[str, Any]:
    def capture(out: Path, host: str) -> dict[str, Any]:
        return _capture(server, out, host=host, iterations=6)

    case = measure_injected_delay(capture, int(server["host"].rsplit(":", 1)[1]), work, phase=phase,
                                  direction=direction)
    return {"case": f"{direction} path (relay, 40 ms)", "phase": phase, "injected_ms": case.injected_ms,
            "grew_ms": case.grew_ms, "error_ms": case.error_ms, "bound_ms": case.bound_ms,
            "ok": abs(case.error_ms) <= case.bound_ms}


def prefill_case(server: dict[str, Any], work: Path) -> dict[str, Any]:
    prefill, runner_says, spreads = {}, {}, []
    for label, prompt in (("short", "{iteration} and again"), ("long", LONG_PROMPT)):
        out = work / f"prefill-{label}"
        values = [_phase_ms(iv, "runner.prefill") for iv in _measured(_capture(server, out, "--second-prompt", prompt))]
        prefill[label], runner_says[label] = statistics.median(values), statistics.median(_prompt_eval_ms(out))
        quartiles = statistics.quantiles(values, n=4)
        spreads.append(quartiles[2] - quartiles[0])
    grew, injected = prefill["long"] - prefill["short"], runner_says["long"] - runner_says["short"]
    bound = delay_bound_ms(injected, max(spreads))
    return {"case": "prefill (+~700 prompt tokens)", "phase": "runner.prefill", "injected_ms": injected,
            "grew_ms": grew, "error_ms": grew - injected, "bound_ms": bound, "ok": abs(grew - injected) <= bound}


def load_case(server: dict[str, Any], work: Path, kind: str) -> dict[str, Any]:
    out = work / f"load-{kind}"
    if kind == "reload":
        attribution = _capture(server, out, "--num-ctx", "2048", "--second-num-ctx", "4096", iterations=4)
        want = "reload"
    else:
        target = str(REPO / "tests" / "targets" / "cold_then_interrupt.py")
        proc = _tracer("capture", "-o", str(out), "--force", "--ollama-host", server["host"], "--", sys.executable,
                       target, MODEL, env={"OLLAMA_HOST": server["host"], "TARGET_ITERATIONS": "4"})
        if proc.returncode != 0:
            raise RuntimeError(f"the cold-load capture failed: {proc.stderr.strip()[-400:]}")
        attribution = json.loads((out / "attribution.json").read_text())
        want = "cold load"
    intervals = [iv for iv in _measured(attribution) if iv["kind"] == "interrupt"]
    loads = [next((p for p in iv["phases"] if p["name"].startswith("server.model_load")), None) for iv in intervals]
    named = [p for p in loads if p is not None and p.get("attributes", {}).get("reason", "").startswith(want)]
    causes = {f["cause"] for f in attribution.get("diagnosis", [])}
    cause = "model_reload" if kind == "reload" else "cold_load"
    return {"case": f"model load ({want})", "phase": "server.model_load",
            "injected_ms": None, "grew_ms": statistics.median(p["duration_ms"] for p in named) if named else None,
            "error_ms": None, "bound_ms": None, "named": f"{len(named)}/{len(intervals)}",
            "ok": bool(intervals) and len(named) == len(intervals) and cause in causes}


def run(version: str) -> list[dict[str, Any]]:
    server = _server(version)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, step in (("request", lambda: relay_case(server, work / "req", REQUEST, "server.receive")),
                           ("response", lambda: relay_case(server, work / "resp", RESPONSE, "server.stream")),
                           ("prefill", lambda: prefill_case(server, work)),
                           ("reload", lambda: load_case(server, work, "reload")),
                           ("cold", lambda: load_case(server, work, "cold"))):
            print(f"accuracy: {version}: {name} …", file=sys.stderr, flush=True)
            try:
                rows.append(step())
            except (RuntimeError, ValueError) as err:
                rows.append({"case": name, "phase": "", "ok": False, "error": str(err)})
    return rows


RECORD = REPO / "tracer" / "accuracy.json"  # shipped in the package: every report's header quotes it


def summary(results: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    """What the reports state: when, on which versions, how many cases in the right phase, and
    the largest error of the timed ones."""
    import datetime

    rows = [row for rows in results.values() for row in rows]
    timed = [row for row in rows if row.get("error_ms") is not None]
    # The worst timed case relative to the target (1 ms or 5 %, the larger).
    worst = max(timed, key=lambda r: abs(r["error_ms"]) / max(1.0, 0.05 * abs(r["injected_ms"])), default=None)
    return {"schema": "tracer.accuracy/1", "date": datetime.date.today().isoformat(),
            "versions": sorted(results), "cases": len(rows), "right_phase": sum(1 for row in rows if row["ok"]),
            "timed": len(timed), "on_target": sum(1 for r in timed
                                                  if abs(r["error_ms"]) <= max(1.0, 0.05 * abs(r["injected_ms"]))),
            "worst": {k: worst[k] for k in ("case", "phase", "injected_ms", "error_ms")} if worst else None,
            "results": results}


def _fmt(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--versions", default="0.13.5,0.34.4", help="testbed Ollama versions, comma-separated")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON here")
    parser.add_argument("--record", action="store_true",
                        help=f"write the summary the reports quote into {RECORD.relative_to(REPO)}")
    args = parser.parse_args()
    results = {version: run(version) for version in args.versions.split(",")}
    for version, rows in results.items():
        print(f"\nOllama {version}")
        print(f"{'case':34} {'phase':20} {'injected ms':>12} {'grew ms':>9} {'error ms':>9} {'bound ms':>9}  result"
              "  (target: 1 ms or 5 %; bound: the target, or 3x the phase's own noise when larger)")
        for row in rows:
            verdict = "WRONG" if not row["ok"] else "ok"
            if row["ok"] and row.get("error_ms") is not None:
                target = max(1.0, 0.05 * abs(row["injected_ms"]))
                verdict = "ok, on target" if abs(row["error_ms"]) <= target else "ok within the noise, off target"
            extra = f" (named in {row['named']} intervals)" if "named" in row else ""
            extra += f" ({row['error']})" if "error" in row else ""
            print(f"{row['case']:34} {row['phase']:20} {_fmt(row.get('injected_ms')):>12} "
                  f"{_fmt(row.get('grew_ms')):>9} {_fmt(row.get('error_ms')):>9} {_fmt(row.get('bound_ms')):>9}  "
                  f"{verdict}{extra}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))
    if args.record:
        RECORD.write_text(json.dumps(summary(results), indent=2) + "\n")
    return 0 if all(row["ok"] for rows in results.values() for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
