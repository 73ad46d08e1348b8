"""llama.cpp inside the client's own process (llama-cpp-python): its libllama's probes split the call,
on synthetic events laid out as one streamed call of the bench runs, and the bpftrace program that
prints them follows the command's processes only."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ollama_tracer.attribution.ebpf_source import EbpfSource
from ollama_tracer.attribution.intervals import Interval
from ollama_tracer.capture.directory import CaptureRecords
from ollama_tracer.collectors.ebpf_events import EbpfRecords, ProbeEvent
from ollama_tracer.collectors.ebpf_plan import ProbePlan, build_in_process_script, plan_in_process
from ollama_tracer.collectors.probe_catalogue import IN_PROCESS, probes_for_design
from ollama_tracer.commands.capture import _bench_in_process, in_process_library
from ollama_tracer.errors import TracerError
from ollama_tracer.system import bpftrace_path
from ollama_tracer.vocabulary import DESIGN_IN_PROCESS, PROCESS_PID, TRACER_REQUEST_WRITTEN_NS, TRACER_RESPONSE_START_NS

MS = 1_000_000
CLIENT, OTHER = 41, 42


def _u(t: float, pid: int, symbol: str) -> ProbeEvent:
    return ProbeEvent("U", int(t * MS), pid, pid, text=symbol)


def _phases(events: list[ProbeEvent], *, handed: float = 2.0, returned: float = 19.0,
            pid: int | None = CLIENT) -> list[tuple[str, float, float, str]]:
    ebpf = EbpfRecords(events=events, meta={"plan": {"design": DESIGN_IN_PROCESS}}, roles={CLIENT: "client"})
    records = CaptureRecords(spans=[], loaded={EbpfRecords: ebpf})
    request = {"startTimeUnixNano": MS, "resource": {PROCESS_PID: pid} if pid else {},
               "attributes": {TRACER_REQUEST_WRITTEN_NS: int(handed * MS),
                              TRACER_RESPONSE_START_NS: int(returned * MS)}}
    interval = Interval(index=0, kind="interrupt", start_ns=0, end_ns=20 * MS, trace_id="t", request=request)
    return [(p.name, p.start_ns / MS, p.end_ns / MS, p.process) for p in EbpfSource().phases(interval, records)]


def _call(start: float) -> list[ProbeEvent]:
    return [_u(start, CLIENT, "llama_sampler_chain_init"), _u(start + 1.0, CLIENT, "llama_decode"),
            _u(start + 12.0, CLIENT, "llama_sampler_sample")]


def test_the_call_is_split_at_its_first_decode_and_its_first_sample() -> None:
    events = [_u(0.5, CLIENT, "llama_decode"), _u(0.6, CLIENT, "llama_sampler_sample"), *_call(3.0)]
    assert _phases(events) == [("runner.admit", 2.0, 4.0, "client"), ("runner.prefill", 4.0, 15.0, "client"),
                               ("runner.sample", 15.0, 19.0, "client")]


def test_another_process_hits_are_not_this_calls() -> None:
    # Another process of the command (a worker of its own) decodes first: this client's are its own.
    events = [_u(2.5, OTHER, "llama_decode"), _u(2.8, OTHER, "llama_sampler_sample"), *_call(3.0)]
    assert [name for name, *_ in _phases(events)] == ["runner.admit", "runner.prefill", "runner.sample"]
    assert _phases(events)[1][1:3] == (4.0, 15.0)


def test_no_sample_before_the_first_token_gives_no_phases_not_a_guess() -> None:
    events = [_u(3.0, CLIENT, "llama_sampler_chain_init"), _u(4.0, CLIENT, "llama_decode"),
              _u(19.5, CLIENT, "llama_sampler_sample")]  # after the token came back: not this token's
    assert _phases(events) == []
    ebpf = EbpfRecords(events=events, meta={"plan": {"design": DESIGN_IN_PROCESS}}, roles={CLIENT: "client"})
    request = {"startTimeUnixNano": MS, "resource": {PROCESS_PID: CLIENT},
               "attributes": {TRACER_REQUEST_WRITTEN_NS: 2 * MS, TRACER_RESPONSE_START_NS: 19 * MS}}
    found = EbpfSource().find(Interval(0, "interrupt", 0, 20 * MS, "t", request),
                              CaptureRecords(spans=[], loaded={EbpfRecords: ebpf}))
    assert found.outcome["missing"][0]["boundary"] == "llama_sampler_sample"


def test_the_catalogue_probes_libllamas_public_api_once_per_call_and_per_token() -> None:
    assert probes_for_design(DESIGN_IN_PROCESS, None) == IN_PROCESS
    assert {spec.symbol: spec.per_token for spec in IN_PROCESS} == {
        "llama_sampler_chain_init": False, "llama_decode": True, "llama_sampler_sample": True}
    assert {spec.process for spec in IN_PROCESS} == {"client"}


def _plan(library: Path) -> ProbePlan:
    plan = ProbePlan(binary=library, version=None, design=DESIGN_IN_PROCESS)
    for address, spec in enumerate(IN_PROCESS, 1):
        plan.attached[spec.symbol] = (spec, address)
        plan.targets[spec.symbol] = f"{library}:{spec.symbol}"
    return plan


def test_the_program_follows_the_commands_processes_and_samples_only_those_in_libllama() -> None:
    script = build_in_process_script(_plan(Path("/lib/libllama.so")), ancestor=1234, profile_hz=99)
    assert "@mine[(int64)1234] = 1" in script
    assert "sched_process_fork /@mine[(int64)pid]/ { @mine[(int64)args->child_pid] = 1; }" in script
    assert "profile:hz:99 /@lib[pid]/" in script
    assert "tracepoint:syscalls" not in script  # no connection to follow
    init = next(line for line in script.splitlines() if "llama_sampler_chain_init" in line)
    assert "@gen[pid]++" in init
    decode = next(line for line in script.splitlines() if ":llama_decode" in line)
    assert "@seen[pid, 1] != @gen[pid]" in decode


def test_the_bench_is_recognised_and_a_missing_library_is_one_sentence() -> None:
    assert _bench_in_process(["tracer", "bench", "interrupt", "--backend", "llama-cpp-python"])
    assert _bench_in_process(["tracer", "bench", "interrupt", "--backend=llama-cpp-python"])
    assert not _bench_in_process(["tracer", "bench", "interrupt", "--backend", "llama-server"])
    assert not _bench_in_process(["python", "app.py", "--backend", "llama-cpp-python"])
    with pytest.raises(TracerError, match=r"no libllama\.so"):
        in_process_library("/nonexistent/libllama.so")


def _real_library() -> Path | None:
    try:
        return in_process_library("auto")
    except TracerError:
        return None


@pytest.mark.skipif(os.geteuid() != 0 or bpftrace_path() is None, reason="needs root and bpftrace")
def test_the_real_program_prints_the_commands_calls_and_nothing_of_other_processes(tmp_path: Path) -> None:
    """bpftrace on a real libllama: a child of this test calling llama_sampler_chain_init is seen
    (once per call, the per-token ones re-armed by it); a process outside this tree is not."""
    library = _real_library()
    if library is None:
        pytest.skip("no libllama.so built here (the testbed's llama.cpp build)")
    plan = plan_in_process(library)
    assert plan.missing == [] and set(plan.attached) == {spec.symbol for spec in IN_PROCESS}
    calls = ("import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
             "lib.llama_sampler_chain_init.restype = ctypes.c_void_p; "
             "lib.llama_sampler_chain_init.argtypes = [ctypes.c_uint8]; "
             "lib.llama_sampler_free.argtypes = [ctypes.c_void_p]; "
             "[lib.llama_sampler_free(lib.llama_sampler_chain_init(1)) for _ in range(3)]")
    # Not followed: a process that was already running when bpftrace started (it maps the same
    # library, as a llama-server or an Ollama runner would), making the same calls meanwhile.
    go = tmp_path / "go"
    wait = f"import pathlib, time\nwhile not pathlib.Path({str(go)!r}).exists(): time.sleep(0.01)\n"
    outsider = subprocess.Popen([sys.executable, "-c", wait + calls.replace("; ", "\n"), str(library)])
    proc = subprocess.Popen([bpftrace_path() or "bpftrace", "-e", build_in_process_script(plan, os.getpid())],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # bpftrace's "Attaching N probes..." first
            if "TRACER_EBPF_READY" in line:
                break
        # ours is started after, from this process: its pid is followed through fork
        ours = subprocess.run([sys.executable, "-c", calls, str(library)], check=True)
        assert ours.returncode == 0
        go.touch()
        outsider.wait(timeout=60)
        time.sleep(0.5)
    finally:
        proc.send_signal(2)
        out, _ = proc.communicate(timeout=30)
        if outsider.poll() is None:  # the test failed before letting it go: it must not poll forever
            outsider.kill()
            outsider.wait()
    events = [line.split() for line in out.splitlines() if line.startswith("U ")]
    pids = {fields[2] for fields in events}
    assert str(outsider.pid) not in pids
    index = {symbol: i for i, (symbol, _) in enumerate(sorted(plan.attached.items(), key=lambda kv: kv[1][1]))}
    assert sum(1 for fields in events if fields[4] == str(index["llama_sampler_chain_init"])) == 3
    assert len(pids) == 1

