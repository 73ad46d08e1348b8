"""The collectors a capture runs, in start order, and the loaders that read their raw files back.
Adding a source: one line in ``make_collectors`` and one in ``LOADERS``."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ollama_tracer.collectors import ebpf_events, nvml, ollama_log, otlp, pyspy
from ollama_tracer.collectors.base import Collector, Loader
from ollama_tracer.collectors.ebpf import EbpfCollector
from ollama_tracer.collectors.ebpf_profile import DEFAULT_HZ
from ollama_tracer.collectors.journald import JournaldCollector
from ollama_tracer.collectors.nvml import NvmlCollector
from ollama_tracer.collectors.ollama_log import OllamaLogCollector
from ollama_tracer.collectors.otlp import OtlpCollector
from ollama_tracer.collectors.pyspy import PySpyCollector

# Each collector's ``load(directory, clock)``: its raw files as typed records, or None.
LOADERS: list[Loader[object]] = [otlp.load, ollama_log.load, ebpf_events.load, nvml.load, pyspy.load]


@dataclass
class CollectorOptions:
    """What the user chose on the command line; every collector is on by default."""

    ebpf: bool = True
    ollama_pid: int | None = None
    ebpf_layers: str = "all"
    profile_hz: int = DEFAULT_HZ  # eBPF stacks of the server and runners; 0: off
    ollama_log: Path | None = None
    ollama_unit: str | None = None  # read the log from the journal of this systemd unit instead
    record_content: bool = False
    gpu_rate_hz: float = 100.0  # 0: no NVML sampling
    pyspy_rate_hz: int = 100  # 0: no py-spy
    pyspy_pid: int | None = None  # attach py-spy to this process instead of the command
    in_process: Path | None = None  # llama.cpp in the command's process: probe this libllama.so, no server


def make_collectors(options: CollectorOptions | None = None) -> list[Collector]:
    options = options or CollectorOptions()
    collectors: list[Collector] = []
    if options.ebpf:
        # First, so that its probes are live before anything else starts the workload.
        collectors.append(EbpfCollector(ollama_pid=options.ollama_pid, layers=options.ebpf_layers,
                                        profile_hz=options.profile_hz, in_process=options.in_process))
    if options.ollama_unit and options.ollama_log is None:
        collectors.append(JournaldCollector(options.ollama_unit, record_content=options.record_content))
    else:
        collectors.append(OllamaLogCollector(options.ollama_log, record_content=options.record_content))
    collectors.append(OtlpCollector())
    if options.gpu_rate_hz > 0:
        collectors.append(NvmlCollector(options.gpu_rate_hz))
    if options.pyspy_rate_hz > 0:
        collectors.append(PySpyCollector(options.pyspy_rate_hz, attach_pid=options.pyspy_pid))
    return collectors
