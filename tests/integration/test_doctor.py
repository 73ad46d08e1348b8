"""`tracer doctor` on this machine: eBPF ready, no GPU."""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.conftest import run_tracer

pytestmark = pytest.mark.integration


def _checks(*args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, dict[str, Any]]]:
    proc = run_tracer("doctor", "--json", *args, timeout=60, env=env)
    payload = json.loads(proc.stdout)
    assert payload["schema"] == "tracer.doctor/1"
    return proc.returncode, {c["name"]: c for c in payload["checks"]}


def test_doctor_reports_ebpf_ready_and_nvml_unavailable(testbed: dict[str, Any]) -> None:
    rc, checks = _checks("--host", testbed["ollama_host"])
    assert rc == 0
    assert checks["ollama"]["status"] == "ok" and "0.13.5" in checks["ollama"]["detail"]
    assert checks["bpftrace"]["status"] == "ok"
    assert checks["tracefs"]["status"] == "ok"
    assert checks["privileges"]["status"] == "ok"
    assert checks["ebpf-profile"]["status"] == "ok", checks["ebpf-profile"]
    assert checks["py-spy"]["status"] == "ok", checks["py-spy"]
    assert checks["nvml"]["status"] == "unavailable"
    assert checks["nvml"]["detail"], "NVML unavailable must say why"


def test_doctor_fails_with_fix_when_ollama_is_down() -> None:
    rc, checks = _checks("--host", "http://127.0.0.1:9")
    assert rc == 1
    assert checks["ollama"]["status"] == "fail"
    assert "OLLAMA_HOST" in checks["ollama"]["fix"]


def test_doctor_checks_an_otlp_endpoint_that_is_down() -> None:
    _, checks = _checks("--otlp-endpoint", "http://127.0.0.1:9")
    assert checks["otlp-endpoint"]["status"] == "fail"
    assert checks["otlp-endpoint"]["fix"]
