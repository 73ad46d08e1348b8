"""The collectors a capture runs, in start order. Adding a source: one line here."""

from __future__ import annotations

from pathlib import Path

from collectors.base import Collector
from collectors.ebpf import EbpfCollector
from collectors.ollama_log import OllamaLogCollector
from collectors.otlp import OtlpCollector


def make_collectors(*, ebpf: bool = True, ollama_pid: int | None = None, ebpf_layers: str = "all",
                    ollama_log: Path | None = None, record_content: bool = False) -> list[Collector]:
    collectors: list[Collector] = []
    if ebpf:
        # First, so that its probes are live before anything else starts the workload.
        collectors.append(EbpfCollector(ollama_pid=ollama_pid, layers=ebpf_layers))
    collectors.append(OllamaLogCollector(ollama_log, record_content=record_content))
    collectors.append(OtlpCollector())
    return collectors
