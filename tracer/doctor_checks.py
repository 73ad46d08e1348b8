"""The checks behind `tracer doctor`. Each returns one result with the exact fix."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Literal
from urllib.parse import urlsplit

import requests
from ollama_tracer import system

Status = Literal["ok", "unavailable", "fail", "skipped"]


@dataclass(frozen=True)
class CheckResult:
    name: str
    status: Status
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "ok": self.ok}


def check_ollama(host: str) -> CheckResult:
    try:
        response = requests.get(f"{host}/api/version", timeout=3)
        response.raise_for_status()
        version = response.json()["version"]
    except (requests.RequestException, ValueError, KeyError) as err:
        return CheckResult(
            "ollama", "fail", f"not reachable at {host} ({type(err).__name__})",
            "start Ollama (`ollama serve` or `tracer testbed up`) and set OLLAMA_HOST to its address",
        )
    return CheckResult("ollama", "ok", f"version {version} at {host}")


def check_privileges() -> CheckResult:
    if system.can_bpf():
        return CheckResult("privileges", "ok", "root or CAP_BPF: eBPF probes can load")
    return CheckResult(
        "privileges", "unavailable", "not root and no CAP_BPF: eBPF probes cannot load",
        "run tracer with sudo, or `sudo setcap cap_bpf,cap_perfmon,cap_sys_ptrace+ep $(which bpftrace)`",
    )


def check_bpftrace() -> CheckResult:
    path = system.bpftrace_path()
    if path is None:
        return CheckResult("bpftrace", "unavailable", "bpftrace is not installed",
                           "`sudo apt-get install -y bpftrace` (Debian/Ubuntu)")
    version = system.bpftrace_version(path)
    if version is None:
        return CheckResult("bpftrace", "fail", f"{path} does not run", "reinstall bpftrace")
    return CheckResult("bpftrace", "ok", f"{version} at {path}")


def check_ebpf_profile() -> CheckResult:
    """Whether a ``profile`` probe loads (perf events may be restricted even for bpftrace)."""
    path = system.bpftrace_path()
    if path is None or not system.can_bpf():
        return CheckResult("ebpf-profile", "unavailable", "needs bpftrace and root or CAP_BPF (see above)",
                           "fix the bpftrace and privileges checks first")
    try:
        out = subprocess.run([path, "-e", 'profile:hz:99 { printf("ok\\n"); exit(); }'], capture_output=True,
                             text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return CheckResult("ebpf-profile", "fail", f"a profile probe did not run ({err})", "check `bpftrace -l`")
    if "ok" not in out.stdout.split():
        reason = next((line for line in out.stderr.splitlines() if "RLIMIT_MEMLOCK" not in line and line.strip()),
                      "no sample")
        return CheckResult("ebpf-profile", "unavailable", f"profile:hz:99 did not fire: {reason}",
                           "check `sysctl kernel.perf_event_paranoid` (needs <= 2 with CAP_PERFMON, or root)")
    return CheckResult("ebpf-profile", "ok", "profile:hz:99 fires; server and runner stacks can be sampled")


def check_tracefs() -> CheckResult:
    path = system.tracefs_path()
    if path is None:
        return CheckResult("tracefs", "unavailable", "tracefs is not mounted: uprobes cannot attach",
                           "`sudo mount -t tracefs nodev /sys/kernel/tracing`")
    return CheckResult("tracefs", "ok", f"mounted at {path}")


def check_pyspy() -> CheckResult:
    path = shutil.which("py-spy")
    if path is None:
        return CheckResult("py-spy", "unavailable", "py-spy is not installed", "`pip install py-spy`")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired) as err:
        return CheckResult("py-spy", "fail", f"{path} does not run ({err})", "reinstall py-spy")
    version = out.stdout.strip()
    if system.has_capability(system.CAP_SYS_PTRACE):
        return CheckResult("py-spy", "ok", f"{version}; can sample any process (root or CAP_SYS_PTRACE)")
    scope = system.ptrace_scope()
    if scope in (None, 0, 1):
        return CheckResult("py-spy", "ok", f"{version}; can sample its own children (ptrace_scope={scope})")
    return CheckResult(
        "py-spy", "unavailable", f"{version}; kernel.yama.ptrace_scope={scope} forbids sampling",
        "run tracer with sudo, or `sudo sysctl kernel.yama.ptrace_scope=1`",
    )


def check_nvml() -> CheckResult:
    try:
        import pynvml
    except ImportError:
        return CheckResult("nvml", "unavailable", "the nvidia-ml-py package is not installed",
                           "`pip install nvidia-ml-py`")
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as err:
        return CheckResult("nvml", "unavailable", f"NVML cannot initialise: {err}",
                           "GPU sampling needs an NVIDIA GPU and driver; CPU-only machines need no fix")
    try:
        count = pynvml.nvmlDeviceGetCount()
        driver = pynvml.nvmlSystemGetDriverVersion()
        names = [pynvml.nvmlDeviceGetName(pynvml.nvmlDeviceGetHandleByIndex(i)) for i in range(count)]
    finally:
        pynvml.nvmlShutdown()
    if count == 0:
        return CheckResult("nvml", "unavailable", f"driver {driver} but no GPU", "")
    return CheckResult("nvml", "ok", f"driver {driver}; {count} GPU(s): {', '.join(map(str, names))}")


def check_otlp_endpoint(endpoint: str | None) -> CheckResult:
    if not endpoint:
        return CheckResult("otlp-endpoint", "skipped", "no --otlp-endpoint given")
    parts = urlsplit(endpoint if "://" in endpoint else f"http://{endpoint}")
    host, port = parts.hostname or "127.0.0.1", parts.port or 4317
    try:
        with socket.create_connection((host, port), timeout=3):
            pass
    except OSError as err:
        return CheckResult("otlp-endpoint", "fail", f"{host}:{port} refuses connections ({err.strerror})",
                           "start Jaeger (`tracer testbed up --with-jaeger` or `docker compose up -d`)")
    return CheckResult("otlp-endpoint", "ok", f"{host}:{port} accepts connections")


def check_jaeger_query(url: str | None) -> CheckResult:
    if not url:
        return CheckResult("jaeger-query", "skipped", "no --jaeger-query given")
    try:
        response = requests.get(f"{url.rstrip('/')}/api/services", timeout=3)
        response.raise_for_status()
    except requests.RequestException as err:
        return CheckResult("jaeger-query", "fail", f"{url} does not answer ({type(err).__name__})",
                           "start Jaeger (`tracer testbed up --with-jaeger` or `docker compose up -d`)")
    return CheckResult("jaeger-query", "ok", f"{url} answers /api/services")


def check_deployment(host: str) -> list[CheckResult]:
    """Which deployment serves ``host`` (plain process, system service, container behind a
    forwarder), and what of it the collectors reach from here, each with the fix for the rest."""
    from ollama_tracer import deployment
    from ollama_tracer.ollama_host import host_and_port
    from ollama_tracer.process_discovery import server_settings

    try:
        pid, forwarder = deployment.follow(host_and_port(host)[1])
    except OSError as err:
        return [CheckResult("deployment", "unavailable", f"could not follow the port ({err})")]
    if pid is None:
        return [CheckResult("deployment", "skipped", f"no process on this machine listens on {host}",
                            "run tracer on the machine Ollama runs on (as root, to see other users' processes)")]
    found = deployment.detect(pid, forwarder)
    results = []
    where = {deployment.PLAIN: "a plain process", deployment.SERVICE: f"the systemd unit {found.unit}.service",
             deployment.CONTAINER: "a container" + (f" {found.container_id[:12]}" if found.container_id else "")}
    detail = f"{where[found.kind]}: pid {pid}" + (f" (pid {found.pid_inside} inside)" if found.pid_inside else "")
    detail += f", user {found.user}" if found.user else ""
    if forwarder is not None:
        detail += (f", behind {forwarder.name} (pid {forwarder.pid}) forwarding port {forwarder.published_port} to "
                   f"{forwarder.target.address}:{forwarder.target.port}, found by its {forwarder.how}")
    results.append(CheckResult("deployment", "ok", detail))
    try:
        exe = os.readlink(f"/proc/{pid}/exe")
        through = f"{found.root}{exe}" if found.root else exe
        os.stat(through)
        results.append(CheckResult("server binary", "ok", f"{exe}" + (f", read through {through}" if found.root else "")
                                   + ": uprobes can attach"))
    except OSError as err:
        results.append(CheckResult("server binary", "unavailable", f"cannot open the server's binary ({err.strerror})",
                                   "run tracer as root on the host (a container's files are reached through "
                                   f"/proc/{pid}/root, which needs root or CAP_SYS_PTRACE)"))
    settings = server_settings(pid)
    debug_fix = {
        deployment.SERVICE: f"`sudo systemctl edit {found.unit}`, add `[Service]` and "
                            "`Environment=\"OLLAMA_DEBUG=1\"`, then `sudo systemctl restart " f"{found.unit}`",
        deployment.CONTAINER: "add `OLLAMA_DEBUG=1` to the container's environment (`docker run -e OLLAMA_DEBUG=1`, or "
                              "`environment:` in docker-compose.yml) and recreate it",
        deployment.PLAIN: "start the server with `OLLAMA_DEBUG=1 ollama serve`",
    }[found.kind]
    if settings.get("OLLAMA_DEBUG") in (None, "", "0", "false"):
        results.append(CheckResult("server log", "unavailable",
                                   "OLLAMA_DEBUG is not set in the server's environment: its log has no phase lines",
                                   debug_fix))
    elif found.kind == deployment.SERVICE:
        results.append(CheckResult("server log", "ok", f"the journal of {found.unit}.service "
                                   f"(`journalctl -u {found.unit}`), read by default"))
    elif found.kind == deployment.CONTAINER and found.docker_log():
        results.append(CheckResult("server log", "ok", f"Docker's json-file log {found.docker_log()}, read by default"))
    elif found.stderr_file():
        results.append(CheckResult("server log", "ok", f"{found.stderr_file()} (the server's stderr), read by default"))
    else:
        results.append(CheckResult("server log", "unavailable", "the server's log file is not known from here",
                                   "pass --ollama-log FILE (its stderr; for a container: "
                                   "`docker inspect -f '{{.LogPath}}' NAME`)"))
    return results


def run_checks(ollama_host: str, otlp_endpoint: str | None, jaeger_query: str | None) -> list[CheckResult]:
    checks: list[Callable[[], CheckResult | list[CheckResult]]] = [
        lambda: check_ollama(ollama_host),
        lambda: check_deployment(ollama_host),
        check_privileges,
        check_bpftrace,
        check_tracefs,
        check_ebpf_profile,
        check_pyspy,
        check_nvml,
        lambda: check_otlp_endpoint(otlp_endpoint),
        lambda: check_jaeger_query(jaeger_query),
    ]
    results: list[CheckResult] = []
    for check in checks:
        found = check()
        results.extend(found if isinstance(found, list) else [found])
    return results
