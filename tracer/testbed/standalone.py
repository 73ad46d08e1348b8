"""The testbed's engines without Ollama: upstream llama.cpp's ``llama-server`` on its own.

`tracer testbed up --llama-server` starts one ``llama-server`` per synthetic model, from the
llama.cpp build the v0.34 testbed already made (``lib/ollama/llama-server``; nothing is compiled a
second time), each on a free loopback port, with the model's Ollama name as its alias. Its
settings mirror Ollama's defaults, so that the two are compared on one scenario: one slot
(``OLLAMA_NUM_PARALLEL=1``) and a 4096-token context (Ollama's default ``num_ctx``).

The same build is the library llama-cpp-python loads (``LLAMA_CPP_LIB_PATH``): scripts/bootstrap.sh
installs the package with ``CMAKE_ARGS=-DLLAMA_BUILD=OFF``, so it compiles no llama.cpp of its own.
Its state is ``llama-servers.json`` in the testbed directory, beside Ollama's ``state.json``.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed import llama_server_build, ollama_build
from ollama_tracer.testbed.models import SPECS, ModelSpec, write_model
from ollama_tracer.testbed.runtime import ManagedProcess, free_loopback_port
from ollama_tracer.testbed.steps import Progress, cache_dir
from ollama_tracer.vocabulary import LLAMA_SERVER

LLAMA_SERVER_FROM = "0.34.4"  # the Ollama release whose llama.cpp build the standalone engines use
N_CTX = 4096
STATE_NAME = "llama-servers.json"


@dataclass
class LlamaServer:
    model: str  # its alias: the Ollama name of the same synthetic model
    host: str
    gguf: str
    process: ManagedProcess

    def alive(self) -> bool:
        return self.process.alive()


def lib_dir(cache: Path | None = None) -> Path:
    """The llama.cpp libraries (and ``llama-server``) of the testbed's v0.34 build."""
    return llama_server_build.install_dir(cache or cache_dir(), LLAMA_SERVER_FROM) / "lib" / "ollama"


def gguf_path(spec: ModelSpec) -> Path:
    """A synthetic model's GGUF file, written once into the cache."""
    directory = cache_dir() / "models"
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / spec.filename
    if not path.exists():
        write_model(spec, path)
    return path


def model_file(name: str) -> Path | None:
    """The GGUF file of a testbed model named ``name`` (e.g. ``tracer-gemma3:test``), or None."""
    for spec in SPECS:
        if spec.name == name:
            return gguf_path(spec)
    return None


def load(directory: Path) -> list[LlamaServer]:
    path = directory / STATE_NAME
    try:
        rows = json.loads(path.read_text())
    except (OSError, ValueError):
        return []
    return [LlamaServer(model=r["model"], host=r["host"], gguf=r["gguf"], process=ManagedProcess(**r["process"]))
            for r in rows]


def _save(directory: Path, servers: list[LlamaServer]) -> None:
    path = directory / STATE_NAME
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps([asdict(s) for s in servers], indent=2) + "\n")
    os.replace(tmp, path)


def healthy(host: str, timeout_s: float = 2.0) -> bool:
    try:
        return requests.get(f"{host}/health", timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def running(directory: Path) -> list[LlamaServer]:
    return [s for s in load(directory) if s.alive()]


def up(directory: Path, progress: Progress) -> list[LlamaServer]:
    """One healthy ``llama-server`` per synthetic model: the running ones reused, the rest started."""
    cache = cache_dir()
    ollama_build.ensure_ollama(cache, LLAMA_SERVER_FROM, progress)  # seconds once built
    binary = lib_dir(cache) / LLAMA_SERVER
    if not binary.exists():
        raise TracerError(f"the v{LLAMA_SERVER_FROM} build has no {binary}; remove "
                          f"{llama_server_build.install_dir(cache, LLAMA_SERVER_FROM)} and run `tracer testbed up "
                          f"--llama-server` again to rebuild it.", ExitCode.BUILD_FAILED)
    servers = {s.model: s for s in load(directory)}
    for spec in SPECS:
        existing = servers.get(spec.name)
        if existing is not None and existing.alive() and healthy(existing.host):
            progress(f"reusing llama-server for {spec.name} (pid {existing.process.pid}) on {existing.host}")
            continue
        if existing is not None:
            existing.process.stop()
        servers[spec.name] = _start(binary, spec, directory, progress,
                                    port=int(existing.host.rsplit(":", 1)[1]) if existing else None)
        _save(directory, list(servers.values()))
    _save(directory, list(servers.values()))
    return list(servers.values())


def _start(binary: Path, spec: ModelSpec, directory: Path, progress: Progress, port: int | None,
           timeout_s: float = 60.0) -> LlamaServer:
    port = port or free_loopback_port()
    host, gguf = f"http://127.0.0.1:{port}", gguf_path(spec)
    log = directory / f"llama-server-{spec.name.replace(':', '-')}.log"
    argv = [str(binary), "--model", str(gguf), "--alias", spec.name, "--host", "127.0.0.1", "--port", str(port),
            "--ctx-size", str(N_CTX), "--parallel", "1", "--no-webui"]
    progress(f"starting llama-server for {spec.name} on {host} (log: {log})")
    env = dict(os.environ, LD_LIBRARY_PATH=str(binary.parent))
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    managed = ManagedProcess(pid=proc.pid, argv=argv, log=str(log))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TracerError(f"llama-server exited with code {proc.returncode} at start-up; read {log} for the cause.",
                              ExitCode.OLLAMA_UNREACHABLE)
        if healthy(host, timeout_s=0.5):
            return LlamaServer(model=spec.name, host=host, gguf=str(gguf), process=managed)
        time.sleep(0.2)
    managed.stop()
    raise TracerError(f"llama-server did not answer on {host} within {timeout_s:.0f} s; read {log} for the cause.",
                      ExitCode.OLLAMA_UNREACHABLE)


def down(directory: Path) -> list[str]:
    """Stop every standalone engine; what was stopped, one phrase each."""
    stopped = []
    for server in load(directory):
        if server.alive():
            stopped.append(f"llama-server {server.model} (pid {server.process.pid})")
        server.process.stop()
    (directory / STATE_NAME).unlink(missing_ok=True)
    return stopped


def host_for(directory: Path, model: str) -> str | None:
    """The running testbed llama-server serving ``model``, if any."""
    return next((s.host for s in running(directory) if s.model == model), None)
