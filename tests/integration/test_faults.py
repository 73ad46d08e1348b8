"""Faults real users hit, on the real testbed: each ends with a clear error or a complete capture,
and nothing recorded before the fault is lost."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.testbed.runtime import start_ollama

from tests.conftest import REPO, heal_testbed, run_tracer

pytestmark = pytest.mark.integration
LLAMA = "tracer-llama:test"


def _start(out: Path, host: str, *command: str, extra: tuple[str, ...] = ()) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "ollama_tracer", "capture", "-o", str(out), "--force", "--ollama-host", host, *extra,
         "--", *command], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1", OLLAMA_HOST=host))


def _bench(host: str, iterations: int) -> tuple[str, ...]:
    return (sys.executable, "-m", "ollama_tracer", "bench", "interrupt", "--host", host, "--model", LLAMA,
            "--iterations", str(iterations), "--request-timeout", "20")


class Stalled(Exception):
    """Ollama v0.13's interrupt deadlock (README) stopped the benchmark (exit code 11)."""


def _retrying_after_a_stall(testbed: dict[str, Any], attempt: Callable[[], None]) -> None:
    try:
        attempt()
    except Stalled:
        print("\nNOTE: Ollama stalled under the benchmark (v0.13 interrupt deadlock); healing and retrying",
              file=sys.stderr)
        heal_testbed(testbed)
        attempt()


def _wait_for(check: Callable[[], bool], proc: subprocess.Popen[str], timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if proc.poll() == 11:
            raise Stalled(proc.communicate()[1][-500:])
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "timed out waiting"
        time.sleep(0.05)


def _wait_for_iteration(proc: subprocess.Popen[str], number: int) -> None:
    """Until the benchmark reports iteration ``number`` on stderr (the capture passes it through):
    its spans reach the capture only in batches, so the files lag behind."""
    assert proc.stderr is not None
    marker = f"iteration {number} ("
    while True:
        line = proc.stderr.readline()
        if not line:
            if proc.wait() == 11:
                raise Stalled("the benchmark stopped before that iteration")
            raise AssertionError(f"the capture ended (exit {proc.returncode}) before iteration {number}")
        if marker in line:
            return


def _spans_of_iterations(out: Path) -> int:
    spans = out / "raw" / "client_spans.jsonl"
    return spans.read_text(errors="replace").count("bench.interrupt.iteration") if spans.exists() else 0


def _report(out: Path) -> dict[str, Any]:
    report = run_tracer("report", str(out), "--format", "json", timeout=120)
    assert report.returncode == 0, report.stderr
    attribution: dict[str, Any] = json.loads(report.stdout)
    for interval in attribution["intervals"]:
        total = sum(p["duration_ms"] for p in interval["phases"]) + interval["unattributed_ms"]
        assert abs(total - interval["duration_ms"]) < 0.01
    return attribution


def test_ollama_killed_mid_capture(testbed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cap"
    stderr, code = "", None

    def attempt() -> None:
        """Against an Ollama of this test's own (on the testbed's models), free to be killed."""
        nonlocal stderr, code
        own, host = start_ollama(Path(testbed["ollama_binary"]), Path(testbed["ollama_log"]).parent,
                                 lambda _m: None, log=tmp_path / "own-ollama.log")
        try:
            proc = _start(out, host, *_bench(host, 40))
            _wait_for_iteration(proc, 3)
            os.killpg(own.pid, signal.SIGKILL)  # the server and its runners
            _, stderr = proc.communicate(timeout=180)
            code = proc.returncode
        finally:
            own.stop()

    # A stall of its own server (the v0.13 deadlock) before the third iteration: a fresh server, once.
    try:
        attempt()
    except Stalled:
        print("\nNOTE: the test's own Ollama stalled (v0.13 interrupt deadlock); retrying with a fresh one",
              file=sys.stderr)
        attempt()
    assert code not in (0, 130), stderr  # the benchmark's own failure, passed through
    meta = json.loads((out / "capture.json").read_text())
    assert meta["complete"] and meta["exit_code"] == code
    assert any("exited during the capture" in error for error in meta["errors"]), meta["errors"]
    attribution = _report(out)
    intact = [iv for iv in attribution["intervals"] if any(p["source"] == "ebpf" for p in iv["phases"])]
    assert len(intact) >= 2, [iv["kind"] for iv in attribution["intervals"]]


def test_bpftrace_killed_mid_capture(testbed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cap"
    host = testbed["ollama_host"]

    def attempt() -> None:
        proc = _start(out, host, *_bench(host, 12))
        _wait_for_iteration(proc, 3)
        bpftrace = subprocess.run(["pgrep", "-P", str(proc.pid), "bpftrace"], capture_output=True, text=True)
        assert bpftrace.stdout.strip(), "no bpftrace child"
        os.kill(int(bpftrace.stdout.split()[0]), signal.SIGKILL)
        _, stderr = proc.communicate(timeout=300)
        if proc.returncode == 11:
            raise Stalled(stderr[-500:])
        assert proc.returncode == 0, stderr

    _retrying_after_a_stall(testbed, attempt)
    ebpf = json.loads((out / "capture.json").read_text())["collectors"]["ebpf"]
    assert ebpf["ran"] and ebpf["stats"]["exited_early"] is True, ebpf
    attribution = _report(out)
    measured = [iv for iv in attribution["intervals"] if not iv["warmup"]]
    with_ebpf = [iv for iv in measured if any(p["source"] == "ebpf" for p in iv["phases"])]
    assert with_ebpf and len(with_ebpf) < len(measured)  # before the kill: eBPF; after: the coarser sources
    assert all(iv["coverage"] > 0.9 for iv in measured)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    mount = tmp_path / "small"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(directory: Path) -> None:
    """Take every free byte of the disk holding ``directory``."""
    with (directory / "filler").open("wb", buffering=0) as filler:  # unbuffered: closing flushes nothing
        try:
            while True:
                filler.write(b"\0" * 65536)
        except OSError:
            pass


def test_disk_full_while_writing(testbed: dict[str, Any], small_disk: Path, tmp_path: Path) -> None:
    out = small_disk / "cap"
    host = testbed["ollama_host"]
    stderr = ""

    def attempt() -> None:
        nonlocal stderr
        (small_disk / "filler").unlink(missing_ok=True)
        proc = _start(out, host, *_bench(host, 12))
        _wait_for_iteration(proc, 3)
        _wait_for(lambda: _spans_of_iterations(out) >= 3, proc)  # spans land within 0.2 s of ending
        _fill(small_disk)  # the disk fills mid-capture
        _, stderr = proc.communicate(timeout=300)
        if "accepted a request and then sent nothing" in stderr:  # the benchmark met the v0.13 deadlock too
            raise Stalled(stderr[-500:])
        assert proc.returncode == 13, (proc.returncode, stderr[-2000:])

    _retrying_after_a_stall(testbed, attempt)
    message = [line for line in stderr.splitlines() if line.startswith("tracer: error:")]
    assert len(message) == 1 and "filled up during the capture" in message[0], stderr
    assert f"tracer report {out}" in message[0]
    # What was written stays readable: moved to a disk with room, it reports.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    attribution = _report(copy)
    assert len(attribution["intervals"]) >= 3, "the intervals recorded before the disk filled are there"


def test_ctrl_c_during_start_up(testbed: dict[str, Any], tmp_path: Path) -> None:
    out, marker = tmp_path / "cap", tmp_path / "ran"
    proc = _start(out, testbed["ollama_host"], "sh", "-c", f"touch {marker}")
    _wait_for(lambda: (out / "capture.json").exists(), proc)  # collectors are starting (bpftrace compiles)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    assert not marker.exists(), "the command must not start after Ctrl-C"
    meta = json.loads((out / "capture.json").read_text())
    assert meta["interrupted"] is True and meta["complete"] is True


def test_ctrl_c_while_flushing(testbed: dict[str, Any], tmp_path: Path) -> None:
    out, marker = tmp_path / "cap", tmp_path / "ran"
    host = testbed["ollama_host"]
    script = (f"import ollama, pathlib; ollama.Client(host={host!r}).generate(model={LLAMA!r}, prompt='hi', "
              f"options={{'num_predict': 2}}); pathlib.Path({str(marker)!r}).touch()")
    proc = _start(out, host, sys.executable, "-c", script)
    _wait_for(marker.exists, proc)
    child = subprocess.run(["pgrep", "-P", str(proc.pid), "-f", "import ollama"], capture_output=True, text=True)
    for pid in child.stdout.split():  # the command has exited: collectors stop, outputs are written
        _wait_for(lambda pid=pid: not Path(f"/proc/{pid}").exists(), proc)
    proc.send_signal(signal.SIGINT)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 130, stderr
    meta = json.loads((out / "capture.json").read_text())
    assert meta["complete"] is True and meta["exit_code"] == 0
    assert _report(out)["intervals"], "the capture is complete: report recomputes everything"
