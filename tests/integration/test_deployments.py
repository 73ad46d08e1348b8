"""Ollama v0.34 where users really run it, traced from the host with every mode.

* the system layout: installed as the official installer does (/usr/local/bin/ollama and
  /usr/local/lib/ollama), running as the system user ``ollama`` in ``ollama.service``'s cgroup, its
  log in the journal (``journalctl -u ollama``);
* the container layout: in its own PID, mount and UTS namespaces and root filesystem (the binary
  at /usr/bin/ollama exists only inside), published through Docker's own docker-proxy, its log
  where Docker keeps it.

The tracer is told nothing but the address: it finds the server, its binary, its libraries and
its log from /proc (tracer.testbed.layouts says exactly what each layout is)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Collection, Iterator
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.deployment import follow, ns_pids

from tests.conftest import (
    REPO,
    attach_while_script_runs,
    check_order_and_sums,
    forwarder_held_ms,
    forwarder_hold_check,
    measured,
    retry_after_stall,
    run_tracer,
)

pytestmark = pytest.mark.integration

EBPF_PHASES = {"server.decode", "server.model_lookup", "server.schedule", "runner.admit",
               "runner.prefill"}


def _layout(layout: str, version: str = "0.34.4") -> Iterator[dict[str, Any]]:
    was_running = run_tracer("testbed", "status", "--json", "--ollama", version, "--layout", layout,
                             timeout=60).returncode == 0
    proc = run_tracer("testbed", "up", "--ollama", version, "--layout", layout, "--json", timeout=2400, check=True)
    description = json.loads(proc.stdout)
    server = next(s for s in description["servers"] if s["layout"] == layout and s["version"] == version)
    yield server
    if not was_running:
        run_tracer("testbed", "down", "--ollama", version, "--layout", layout, timeout=120)


@pytest.fixture(scope="module")
def system_server(testbed_v034: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield from _layout("system")


@pytest.fixture(scope="module", params=["0.13.5", "0.34.4"])
def container_server(request: pytest.FixtureRequest, testbed_v034: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """The container layout of each version (v0.13's Go runner, v0.34's llama-server)."""
    yield from _layout("container", request.param)


def _capture_once(target: str, out: Path, iterations: int) -> tuple[dict[str, Any], dict[str, Any]]:
    """One capture of the interrupt benchmark against ``target``: attribution.json, capture.json."""
    proc = run_tracer("capture", "-o", str(out), "--force", "--ollama-host", target, "--",
                      sys.executable, "-m", "ollama_tracer", "bench", "interrupt", "--host", target,
                      "--model", "tracer-llama:test", "--iterations", str(iterations),
                      "--interrupt-after-ms", "300",
                      "--request-timeout", "30", timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return (json.loads((out / "attribution.json").read_text()), json.loads((out / "capture.json").read_text()))


def _capture(server: dict[str, Any], out: Path, iterations: int = 3) -> tuple[dict[str, Any], dict[str, Any]]:
    return retry_after_stall(server, lambda: _capture_once(server["host"], out, iterations))  # type: ignore[no-any-return]


def _attach_ok(host: str, out: Path) -> None:
    """attach around the unmodified script, which must succeed (raised inside the retry, so that a
    script that timed out on a stalled server is tried again)."""
    code, stderr = attach_while_script_runs(host, out)
    assert code == 0, stderr


def _check_intervals(attribution: dict[str, Any], also: Collection[str] = ()) -> list[dict[str, Any]]:
    intervals = measured(attribution)
    assert intervals, attribution.get("notes")
    for interval in intervals:
        check_order_and_sums(interval)
        assert interval["coverage"] >= 0.98, interval
        ebpf = {p["name"] for p in interval["phases"] if p["source"] == "ebpf"}
        why = [m for m in attribution.get("ebpf_matching", {}).get("missing", [])
               if m.get("interval") == interval.get("index")]
        assert EBPF_PHASES | set(also) <= ebpf, (sorted(ebpf), why)
    return intervals


def test_the_system_service_is_found_and_traced_as_the_ollama_user(system_server: dict[str, Any],
                                                                    tmp_path: Path) -> None:
    attribution, capture = _capture(system_server, tmp_path / "c")
    _check_intervals(attribution)
    found = capture["ollama"]["deployment"]
    assert found["kind"] == "system service" and found["unit"] == "ollama" and found["user"] == "ollama", found
    meta = json.loads((tmp_path / "c" / "raw" / "ebpf_meta.json").read_text())
    # resolved from /proc/PID/exe and the install's own lib/ollama, not from the build cache
    assert meta["binary"] == "/usr/local/bin/ollama"
    assert meta["plan"]["library_dir"] == "/usr/local/lib/ollama"
    assert set(meta["roles"].values()) >= {"server", "runner"}
    log = capture["collectors"]["ollama_log"]
    assert log["ran"] and log["stats"]["unit"] == "ollama.service" and log["stats"]["entries"] > 0, log
    assert "completion request" in (tmp_path / "c" / "raw" / "ollama.log").read_text()


def test_the_system_service_under_attach(system_server: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "a"
    retry_after_stall(system_server, lambda: _attach_ok(system_server["host"], out))
    attribution = json.loads((out / "attribution.json").read_text())
    intervals = [iv for iv in attribution["intervals"] if not iv["warmup"]]
    assert intervals
    for interval in intervals:
        assert interval["coverage"] >= 0.98
        assert {p["name"] for p in interval["phases"] if p["source"] == "ebpf"} >= {"server.model_lookup",
                                                                                     "runner.prefill"}
    capture = json.loads((out / "capture.json").read_text())
    assert capture["collectors"]["ollama_log"]["stats"]["unit"] == "ollama.service"  # found from its cgroup


def test_the_container_is_traced_through_its_forwarder_and_its_own_root(container_server: dict[str, Any],
                                                                        tmp_path: Path) -> None:
    attribution, capture = _capture(container_server, tmp_path / "c")
    intervals = _check_intervals(attribution, {"forwarder.request", "forwarder.response"})
    for interval in intervals:
        hops = [p for p in interval["phases"] if p["name"].startswith("forwarder.")]
        assert all(p["process"] == "forwarder" and p["duration_ms"] > 0 for p in hops), hops
    found = capture["ollama"]["deployment"]
    assert found["kind"] == "container" and found["pid_inside"] == 1, found
    assert ns_pids(found["pid"]) == [found["pid"], 1]  # the host pid and the container's
    assert found["root"] == f"/proc/{found['pid']}/root"
    assert found["forwarder"]["name"] == "docker-proxy" and found["forwarder"]["how"] == "arguments"
    assert found["forwarder"]["published_port"] == int(container_server["host"].rsplit(":", 1)[1])
    assert not Path("/usr/bin/ollama").exists() or os.stat("/usr/bin/ollama").st_ino != os.stat(
        f"{found['root']}/usr/bin/ollama").st_ino
    meta = json.loads((tmp_path / "c" / "raw" / "ebpf_meta.json").read_text())
    assert meta["binary"] == f"/proc/{found['pid']}/root/usr/bin/ollama"  # uprobes through /proc/PID/root
    assert meta["plan"]["attached"], meta["plan"].get("missing")
    assert meta["forwarder"]["pid"] == found["forwarder"]["pid"]
    assert meta["roles"][str(found["forwarder"]["pid"])] == "forwarder"
    log = capture["collectors"]["ollama_log"]["stats"]
    assert log["path"].startswith("/var/lib/docker/containers/") and log["bytes"] > 0, log


def test_the_container_under_attach_by_its_published_port(container_server: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "a"
    retry_after_stall(container_server, lambda: _attach_ok(container_server["host"], out))
    meta = json.loads((out / "raw" / "ebpf_meta.json").read_text())
    server_pid, forwarder = follow(int(container_server["host"].rsplit(":", 1)[1]))
    assert forwarder is not None and meta["pid"] == server_pid  # the server behind docker-proxy, not docker-proxy
    attribution = json.loads((out / "attribution.json").read_text())
    intervals = [iv for iv in attribution["intervals"] if not iv["warmup"]]
    assert intervals and all(iv["coverage"] >= 0.98 for iv in intervals)


def _through_delay_forwarder(server: dict[str, Any], delay_s: float,
                             out: Path) -> tuple[list[dict[str, Any]], dict[str, Any], str]:
    """A capture through our own forwarder holding each request ``delay_s``: the measured
    intervals, capture.json, and what the forwarder printed of its holds.

    The forwarder passes requests to the server docker-proxy forwards to, found again on each
    attempt: a restart after the stall keeps the published port but not the server's own."""

    def attempt() -> tuple[dict[str, Any], dict[str, Any], str]:
        _, docker_proxy = follow(int(server["host"].rsplit(":", 1)[1]))
        assert docker_proxy is not None
        relay = subprocess.Popen([sys.executable, str(Path(REPO) / "tests" / "targets" / "delay_forwarder.py"),
                                  str(docker_proxy.target.port), str(delay_s)], stdout=subprocess.PIPE, text=True,
                                 cwd=REPO)
        try:
            assert relay.stdout is not None
            port = int(relay.stdout.readline())
            attribution, capture = _capture_once(f"http://127.0.0.1:{port}", out, iterations=7)
        finally:
            relay.terminate()
            said, _ = relay.communicate(timeout=30)
        return attribution, capture, said

    attribution, capture, said = retry_after_stall(server, attempt)
    assert capture["ollama"]["deployment"]["forwarder"]["name"] == "delay-forwarder"
    assert capture["ollama"]["deployment"]["forwarder"]["how"] == "connection"  # followed, not told
    return _check_intervals(attribution, {"forwarder.request"}), capture, said


def test_a_delay_in_the_forwarder_lands_in_the_forwarders_phase(container_server: dict[str, Any],
                                                                tmp_path: Path) -> None:
    """Ground truth: our own forwarder (the relay, named delay-forwarder) in front of the container,
    passing requests on at once, then holding each 40 ms. Per request, what it held (its receipt of
    the request's first bytes → its send of them, on its own clock) is paired with the phase, which
    runs from the client's end of writing (or the forwarder's read) to the server's read: the
    phase less the hold must not move, and the server's own receive must not grow."""
    arms = {}
    for delay_s in (0.0, 0.04):
        intervals, _, said = _through_delay_forwarder(container_server, delay_s, tmp_path / f"c{delay_s}")
        arms[delay_s] = [
            (phases["forwarder.request"]["duration_ms"], forwarder_held_ms(said, phases["client.request"]["start_ns"]),
             sum(p["duration_ms"] for p in interval["phases"] if p["name"] == "server.receive"))
            for interval in intervals
            for phases in [{p["name"]: p for p in interval["phases"] if p["source"] in ("ebpf", "client")}]]
    medians = forwarder_hold_check(arms)
    print("forwarder hold: " + "; ".join(f"{key} {a:.2f} → {b:.2f} ms" for key, (a, b) in medians.items()))


@pytest.mark.parametrize("layout", ["system", "container"])
def test_doctor_says_which_deployment_it_found_and_how_to_reach_the_rest(
        layout: str, system_server: dict[str, Any], container_server: dict[str, Any]) -> None:
    server = system_server if layout == "system" else container_server
    proc = run_tracer("doctor", "--host", server["host"], "--json", timeout=120)
    checks = {c["name"]: c for c in json.loads(proc.stdout)["checks"]}
    found, binary, log = checks["deployment"], checks["server binary"], checks["server log"]
    assert found["ok"] and binary["ok"] and log["ok"], checks
    if layout == "system":
        assert found["detail"].startswith("the systemd unit ollama.service") and "user ollama" in found["detail"]
        assert "journalctl -u ollama" in log["detail"]
    else:
        assert found["detail"].startswith("a container ") and "(pid 1 inside)" in found["detail"]
        assert "behind docker-proxy" in found["detail"] and "found by its arguments" in found["detail"]
        assert "read through /proc/" in binary["detail"]
        assert "/var/lib/docker/containers/" in log["detail"]
