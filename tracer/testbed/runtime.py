"""Start, reuse and stop the testbed's processes.

``up`` records what it started in ``state.json``; ``down`` stops exactly those processes
(checked by pid *and* command line, so a recycled pid is never killed) and nothing else.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed.models import MODELFILE, SPECS, ModelSpec, write_model
from ollama_tracer.testbed.steps import Progress, cache_dir, run_step

STATE_SCHEMA = "tracer.testbed/1"


def testbed_dir() -> Path:
    path = Path(os.environ.get("TRACER_TESTBED_DIR") or cache_dir() / "testbed")
    path.mkdir(parents=True, exist_ok=True)
    return path


@dataclass
class ManagedProcess:
    pid: int
    argv: list[str]
    log: str

    def alive(self) -> bool:
        """True only if ``pid`` still runs the command we started (pids get recycled)."""
        try:
            cmdline = Path(f"/proc/{self.pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            return False
        return bool(cmdline) and cmdline[0].decode(errors="replace") == self.argv[0]

    def stop(self, timeout_s: float = 10.0) -> None:
        if not self.alive():
            return
        # The process leads its own session, so its group also holds the runner children.
        for sig in (signal.SIGTERM, signal.SIGKILL):
            try:
                os.killpg(self.pid, sig)
            except ProcessLookupError:
                return
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if not self.alive():
                    return
                time.sleep(0.1)


DEFAULT_VERSION = "0.13.5"  # tracer.testbed.ollama_build.OLLAMA_VERSION (not imported: no cycle)


@dataclass
class OllamaServer:
    """One ``ollama serve`` the testbed started: which version, where, from which binary."""

    version: str
    host: str
    binary: str
    process: ManagedProcess
    stripped: bool = False  # True when ``binary`` is the release-form (-s -w) build
    models: list[str] = field(default_factory=list)
    layout: str = "plain"  # testbed.layouts: plain, system (service user, journal), container
    log_source: dict[str, str] = field(default_factory=dict)  # where its lines go, when not a file
    helpers: list[ManagedProcess] = field(default_factory=list)  # the container's forwarder

    @property
    def log_file(self) -> str | None:
        """The file its lines go to (a container's json-file log); None when they go to the journal."""
        if self.layout == "plain":
            return self.log
        return self.log_source.get("file")

    @property
    def key(self) -> str:
        """What the state knows it by: the version, and the layout unless plain (``0.34.4-system``)."""
        return server_key(self.version, self.layout)

    def alive(self) -> bool:
        return self.process.alive() and all(h.alive() for h in self.helpers)

    def stop(self) -> None:
        for helper in self.helpers:
            helper.stop()
        self.process.stop()

    @property
    def log(self) -> str:
        return self.process.log

    @property
    def port(self) -> int:
        return int(self.host.rsplit(":", 1)[1])

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> OllamaServer:
        return cls(
            version=str(raw["version"]),
            host=str(raw["host"]),
            binary=str(raw["binary"]),
            process=ManagedProcess(**raw["process"]),
            stripped=bool(raw.get("stripped", False)),
            models=[str(m) for m in raw.get("models", [])],
            layout=str(raw.get("layout", "plain")),
            log_source={str(k): str(v) for k, v in (raw.get("log_source") or {}).items()},
            helpers=[ManagedProcess(**h) for h in raw.get("helpers") or []],
        )


def server_key(version: str, layout: str = "plain") -> str:
    return version if layout == "plain" else f"{version}-{layout}"


def server_files(directory: Path, version: str) -> tuple[Path, Path]:
    """(log, OLLAMA_MODELS) of the server for ``version``; the default keeps its old names."""
    if version == DEFAULT_VERSION:
        return directory / "ollama.log", directory / "ollama-models"
    return directory / f"ollama-{version}.log", directory / f"ollama-models-{version}"


def _version_from_binary(binary: str | None) -> str:
    name = Path(binary or "").name
    return name.removeprefix("ollama-") if name.startswith("ollama-") else DEFAULT_VERSION


@dataclass
class TestbedState:
    """What ``state.json`` holds.

    ``servers`` lists every Ollama the testbed started (one per version). The top-level
    ``ollama``, ``ollama_host``, ``ollama_binary`` and ``models`` mirror the *primary* server
    (the default version's when it runs, else the first), as they did when there was only one,
    so older readers keep working.
    """

    __test__ = False  # not a pytest test class

    ollama: ManagedProcess | None = None
    ollama_host: str | None = None
    ollama_binary: str | None = None
    jaeger: ManagedProcess | None = None
    jaeger_endpoints: dict[str, str] | None = None
    models: list[str] = field(default_factory=list)
    servers: list[OllamaServer] = field(default_factory=list)

    @classmethod
    def load(cls, path: Path) -> TestbedState:
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            return cls()
        except ValueError:
            return cls()  # a torn state file is as good as none: up re-creates it
        return cls.from_json(raw) if isinstance(raw, dict) else cls()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> TestbedState:
        state = cls()
        if raw.get("jaeger"):
            state.jaeger = ManagedProcess(**raw["jaeger"])
        state.jaeger_endpoints = raw.get("jaeger_endpoints")
        if "servers" in raw:
            state.servers = [OllamaServer.from_json(s) for s in raw.get("servers") or []]
        elif raw.get("ollama") and raw.get("ollama_host"):
            # A state file from before `--ollama VERSION`: its one server is the default version.
            state.servers = [OllamaServer(
                version=_version_from_binary(raw.get("ollama_binary")),
                host=str(raw["ollama_host"]),
                binary=str(raw.get("ollama_binary") or raw["ollama"]["argv"][0]),
                process=ManagedProcess(**raw["ollama"]),
                models=[str(m) for m in raw.get("models", [])],
            )]
        state.sync_primary()
        return state

    def to_json(self) -> dict[str, Any]:
        self.sync_primary()
        return {"schema": STATE_SCHEMA, **asdict(self)}

    def save(self, path: Path) -> None:
        payload = self.to_json()
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(payload, indent=2))
        tmp.replace(path)

    # ------------------------------------------------------------------ servers

    def server(self, key: str) -> OllamaServer | None:
        """The server of ``key``: a version (its plain server) or ``VERSION-LAYOUT``."""
        return next((s for s in self.servers if s.key == key), None)

    def primary(self) -> OllamaServer | None:
        return self.server(DEFAULT_VERSION) or (self.servers[0] if self.servers else None)

    def set_server(self, server: OllamaServer) -> None:
        self.servers = [s for s in self.servers if s.key != server.key] + [server]
        self.servers.sort(key=lambda s: s.version != DEFAULT_VERSION)  # stable: default first
        self.sync_primary()

    def remove_server(self, key: str) -> None:
        self.servers = [s for s in self.servers if s.key != key]
        self.sync_primary()

    def running_servers(self) -> list[OllamaServer]:
        return [s for s in self.servers if s.alive()]

    def sync_primary(self) -> None:
        primary = self.primary()
        if primary is None:
            self.ollama = self.ollama_host = self.ollama_binary = None
            self.models = []
            return
        self.ollama, self.ollama_host = primary.process, primary.host
        self.ollama_binary, self.models = primary.binary, list(primary.models)


def free_loopback_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def ollama_version(host: str, timeout_s: float = 2.0) -> str | None:
    try:
        response = requests.get(f"{host}/api/version", timeout=timeout_s)
        response.raise_for_status()
        return str(response.json()["version"])
    except (requests.RequestException, ValueError, KeyError):
        return None


def start_ollama(binary: Path, directory: Path, progress: Progress, port: int | None = None, *,
                 log: Path | None = None, settings: dict[str, str] | None = None,
                 models_dir: Path | None = None, timeout_s: float = 60.0) -> tuple[ManagedProcess, str]:
    """``ollama serve`` on the testbed's models; ``settings``: more OLLAMA_* variables (e.g. a
    second server with ``OLLAMA_NUM_PARALLEL=2`` beside the testbed's, logging to ``log``);
    ``models_dir``: its own OLLAMA_MODELS (another version's server keeps its registrations
    apart)."""
    port = port or free_loopback_port()
    host = f"http://127.0.0.1:{port}"
    log = log or directory / "ollama.log"
    env = dict(os.environ)
    env.update(
        OLLAMA_HOST=f"127.0.0.1:{port}",
        OLLAMA_DEBUG="1",
        OLLAMA_MODELS=str(models_dir or directory / "ollama-models"),
        OLLAMA_NOPRUNE="1",
        **(settings or {}),
    )
    argv = [str(binary), "serve"]
    progress(f"starting ollama serve on {host} (log: {log})")
    with log.open("ab") as out:
        proc = subprocess.Popen(
            argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    managed = ManagedProcess(pid=proc.pid, argv=argv, log=str(log))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TracerError(
                f"ollama serve exited with code {proc.returncode} at start-up; read {log} for the cause.",
                ExitCode.OLLAMA_UNREACHABLE,
            )
        if ollama_version(host, timeout_s=0.5) is not None:
            return managed, host
        time.sleep(0.2)
    managed.stop()
    raise TracerError(
        f"ollama serve did not answer on {host} within {timeout_s:.0f} s; read {log} for the cause.",
        ExitCode.OLLAMA_UNREACHABLE,
    )


def models_respond(host: str, models: list[str], timeout_s: float = 30.0) -> bool:
    """Does every model answer a tiny request? False when one hangs (see ``ExitCode.SERVER_STALLED``)."""
    for model in models:
        try:
            response = requests.post(
                f"{host}/api/generate", timeout=timeout_s,
                json={"model": model, "prompt": "hi", "stream": False, "options": {"num_predict": 1}},
            )
        except requests.RequestException:
            return False
        if response.status_code != 200:
            return False
    return True


def registered_models(host: str) -> set[str]:
    response = requests.get(f"{host}/api/tags", timeout=10)
    response.raise_for_status()
    return {str(m["name"]) for m in response.json().get("models", [])}


def ensure_models(
    binary: Path, host: str, directory: Path, progress: Progress, specs: tuple[ModelSpec, ...] = SPECS,
    *, server_log: Path | None = None, create_log: Path | None = None,
) -> list[str]:
    """Write each synthetic GGUF once (cached) and register it with ``ollama create``, offline."""
    model_dir = cache_dir() / "models"
    model_dir.mkdir(parents=True, exist_ok=True)
    present = registered_models(host)
    env = dict(os.environ, OLLAMA_HOST=host.removeprefix("http://"))
    for spec in specs:
        gguf_path = model_dir / spec.filename
        if not gguf_path.exists():
            progress(f"writing synthetic {spec.arch} model {gguf_path.name} ({spec.vocab_size} tokens)")
            write_model(spec, gguf_path)
        if spec.name in present:
            continue
        modelfile = model_dir / f"{spec.filename}.Modelfile"
        # FROM must be an existing path: otherwise Ollama treats it as a name and pulls.
        modelfile.write_text(MODELFILE.format(filename=spec.filename))
        run_step(
            f"registering {spec.name} with ollama create",
            [str(binary), "create", spec.name, "-f", str(modelfile)],
            log_path=create_log or directory / "ollama-create.log",
            progress=progress,
            fix=f"read the server log {server_log or directory / 'ollama.log'}",
            cwd=model_dir,
            env=env,
            every_s=30,
        )
    return [spec.name for spec in specs]
