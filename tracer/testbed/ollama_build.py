"""Build Ollama from source through the Go module proxy (cgo, CPU, symbols kept).

Two build shapes, chosen by what the module holds:

* **Go-engine releases** (v0.13.5, the default): one ``go build`` with cgo. ``go install
  github.com/ollama/ollama@v0.13.5`` fails: module zips drop every file under a nested
  ``vendor/`` directory, and four headers live in ``llama/llama.cpp/vendor/``. We copy the
  module to a writable tree and put those headers back from packages this machine can reach:

  * ``nlohmann/json.hpp`` and ``nlohmann/json_fwd.hpp`` from Debian's ``nlohmann-json3-dev``;
  * ``stb/stb_image.h`` from Debian's ``libstb-dev``;
  * ``miniaudio/miniaudio.h`` from llama-cpp-python's sdist on PyPI (its vendored llama.cpp).

  The binary keeps its ELF symbols (no ``-s -w``) so the eBPF collector can attach uprobes by
  name; ``-X version.Version`` makes ``/api/version`` report the real version.

* **llama-server releases** (v0.30 and later, e.g. v0.34.4): a CMake superbuild of upstream
  llama.cpp's ``llama-server`` plus the Go binary; see :mod:`.llama_server_build`.

:func:`ensure_ollama` picks the shape and returns the binaries; :func:`check_served` is the
cheap "does the proxy serve this version at all" test that `up` runs before building anything.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed.steps import Progress, require_tool, run_step

OLLAMA_VERSION = "0.13.5"  # the testbed's default version
OLLAMA_MODULE = "github.com/ollama/ollama"
LLAMA_CPP_PYTHON_SDIST = "llama-cpp-python==0.3.16"
_MINIAUDIO_SDIST_FILE = "llama_cpp_python-0.3.16.tar.gz"
_MINIAUDIO_IN_SDIST = "vendor/llama.cpp/vendor/miniaudio/miniaudio.h"
_DEBIAN_HEADERS = {
    "nlohmann/json.hpp": ("/usr/include/nlohmann/json.hpp", "nlohmann-json3-dev"),
    "nlohmann/json_fwd.hpp": ("/usr/include/nlohmann/json_fwd.hpp", "nlohmann-json3-dev"),
    "stb/stb_image.h": ("/usr/include/stb/stb_image.h", "libstb-dev"),
}
# A release version as the Go module proxy names it, without the leading "v".
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+(?:-[0-9A-Za-z.]+)?$")
# Words in a `go mod download` error that mean "could not ask", not "the proxy said no".
_NETWORK_ERRORS = ("dial tcp", "no such host", "connection refused", "i/o timeout", "TLS handshake",
                   "network is unreachable", "connection reset")
_MODULE_DIRS: dict[str, Path] = {}  # version -> module directory, once asked in this process


@dataclass(frozen=True)
class OllamaBinaries:
    """What a build produced: the binary with symbols, and the release-form one if any."""

    version: str
    symbols: Path
    stripped: Path | None = None

    def pick(self, stripped: bool) -> Path:
        return self.stripped if stripped and self.stripped is not None else self.symbols


def normalize_version(text: str) -> str:
    """``v0.34.4`` or ``0.34.4`` -> ``0.34.4``; ValueError for anything else."""
    version = text.strip().removeprefix("v")
    if not VERSION_RE.match(version):
        raise ValueError(f"{text!r} is not an Ollama release version like 0.13.5 or 0.34.4")
    return version


def ollama_binary_path(cache: Path, version: str = OLLAMA_VERSION) -> Path:
    """Where a Go-engine build puts its binary (kept as it was for v0.13.5's existing caches)."""
    return cache / "bin" / f"ollama-{version}"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "1")
    env["GOFLAGS"] = "-mod=mod"
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _one_line(text: str) -> str:
    return " ".join(text.split())


def module_dir(cache: Path, progress: Progress, version: str = OLLAMA_VERSION) -> Path:
    """Download ``github.com/ollama/ollama@vVERSION`` (cached by Go) and return its directory.

    Raises ``VERSION_NOT_SERVED`` when the proxy refuses the version (403/404/unknown
    revision) and ``BUILD_FAILED`` when it could not be asked at all.
    """
    known = _MODULE_DIRS.get(version)
    if known is not None and known.is_dir():
        return known
    require_tool("go", "install Go >= 1.24 (https://go.dev/dl or `apt-get install golang`)")
    logs = cache / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / "ollama-build.log" if version == OLLAMA_VERSION else logs / f"ollama-{version}-build.log"
    out = logs / ("ollama-mod-download.json" if version == OLLAMA_VERSION
                  else f"ollama-{version}-mod-download.json")
    ref = f"{OLLAMA_MODULE}@v{version}"
    step = f"go mod download {ref}"
    progress(f"downloading {ref} from the Go module proxy (log: {log})")
    proc = subprocess.run(
        ["go", "mod", "download", "-json", ref], cwd=cache, env=_go_env(),
        capture_output=True, text=True, check=False,
    )
    with log.open("a", encoding="utf-8") as handle:
        handle.write(f"\n$ {step}\n{proc.stdout}{proc.stderr}# exit status {proc.returncode}\n")
    out.write_text(proc.stdout)
    try:
        info = json.loads(proc.stdout) if proc.stdout.strip() else {}
    except ValueError:
        info = {}
    error = str(info.get("Error") or "") or (proc.stderr if proc.returncode != 0 else "")
    if proc.returncode != 0 or error:
        reason = _one_line(error)[:300] or f"exit status {proc.returncode}"
        if any(word in error for word in _NETWORK_ERRORS):
            raise TracerError(
                f"Ollama {version}: step '{step}' could not reach the Go module proxy ({reason}); "
                "check GOPROXY and the network, then rerun.",
                ExitCode.BUILD_FAILED,
            )
        raise TracerError(
            f"Ollama {version} is not served by the Go module proxy (step '{step}' failed: {reason}); "
            f"choose a served version such as {OLLAMA_VERSION} or 0.34.4.",
            ExitCode.VERSION_NOT_SERVED,
        )
    try:
        _MODULE_DIRS[version] = Path(info["Dir"])
        return _MODULE_DIRS[version]
    except KeyError as err:
        raise TracerError(
            f"could not read the Ollama {version} module directory from `go mod download` (see {out}); "
            "clear the module cache with `go clean -modcache` and retry.",
            ExitCode.BUILD_FAILED,
        ) from err


def uses_llama_server(module: Path) -> bool:
    """v0.30+ builds upstream llama.cpp's llama-server with a CMake superbuild."""
    return (module / "llama" / "server" / "CMakeLists.txt").is_file() and (module / "cmake" / "local.cmake").is_file()


def built_binaries(cache: Path, version: str) -> OllamaBinaries | None:
    """The finished build of ``version`` in the cache, or None (nothing is downloaded)."""
    from ollama_tracer.testbed import llama_server_build

    legacy = ollama_binary_path(cache, version)
    if legacy.exists():
        return OllamaBinaries(version=version, symbols=legacy)
    return llama_server_build.built(cache, version)


def check_served(cache: Path, version: str, progress: Progress) -> None:
    """Fail fast (``VERSION_NOT_SERVED``) before anything is built or started."""
    if built_binaries(cache, version) is None:
        module_dir(cache, progress, version)


def ensure_ollama(cache: Path, version: str, progress: Progress) -> OllamaBinaries:
    """The binaries of Ollama ``version``, built once into the cache (seconds when cached)."""
    from ollama_tracer.testbed import llama_server_build

    done = built_binaries(cache, version)
    if done is not None:
        return done
    module = module_dir(cache, progress, version)
    if uses_llama_server(module):
        return llama_server_build.build(cache, version, module, progress)
    return OllamaBinaries(version=version, symbols=build_ollama(cache, progress, version=version, module=module))


def _miniaudio_header(cache: Path, progress: Progress) -> Path:
    header = cache / "headers" / "miniaudio" / "miniaudio.h"
    if header.exists():
        return header
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / _MINIAUDIO_SDIST_FILE
    if not sdist.exists():
        run_step(
            f"downloading miniaudio.h inside the {LLAMA_CPP_PYTHON_SDIST} sdist from PyPI",
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             LLAMA_CPP_PYTHON_SDIST, "-d", str(downloads)],
            log_path=cache / "logs" / "ollama-build.log",
            progress=progress,
            fix="check that PyPI is reachable (pip config, proxy)",
        )
    with tarfile.open(sdist) as tar:
        member = next((m for m in tar.getmembers() if m.name.endswith(_MINIAUDIO_IN_SDIST)), None)
        extracted = tar.extractfile(member) if member is not None else None
        if extracted is None:
            raise TracerError(
                f"{sdist.name} has no {_MINIAUDIO_IN_SDIST}; delete {sdist} and retry.",
                ExitCode.BUILD_FAILED,
            )
        header.parent.mkdir(parents=True, exist_ok=True)
        header.write_bytes(extracted.read())
    return header


def _restore_vendor_headers(src: Path, cache: Path, progress: Progress) -> None:
    vendor = src / "llama" / "llama.cpp" / "vendor"
    for relative, (system_path, package) in _DEBIAN_HEADERS.items():
        if not Path(system_path).exists():
            raise TracerError(
                f"{system_path} is missing; install it with `apt-get install -y {package}`.",
                ExitCode.MISSING_DEPENDENCY,
            )
        target = vendor / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(system_path, target)
    target = vendor / "miniaudio" / "miniaudio.h"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(_miniaudio_header(cache, progress), target)


def writable_copy(module: Path, target: Path) -> Path:
    """Copy a (read-only) module-cache tree to ``target`` and make it writable."""
    if target.exists():
        shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copytree(module, target, symlinks=True)
    for path in [target, *target.rglob("*")]:  # the module cache is read-only
        if not path.is_symlink():
            path.chmod(path.stat().st_mode | 0o200)
    return target


def build_ollama(cache: Path, progress: Progress, *, version: str = OLLAMA_VERSION,
                 module: Path | None = None) -> Path:
    """Return the path of a built Go-engine ``ollama`` binary, building it only when it is missing."""
    binary = ollama_binary_path(cache, version)
    if binary.exists():
        return binary
    require_tool("go", "install Go >= 1.24 (https://go.dev/dl or `apt-get install golang`)")
    require_tool("gcc", "install a C toolchain with `apt-get install -y build-essential`")
    require_tool("g++", "install a C++ toolchain with `apt-get install -y build-essential`")
    module = module or module_dir(cache, progress, version)
    src = writable_copy(module, cache / "src" / f"ollama-{version}")
    _restore_vendor_headers(src, cache, progress)
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".partial")
    log = cache / "logs" / ("ollama-build.log" if version == OLLAMA_VERSION else f"ollama-{version}-build.log")
    run_step(
        f"building Ollama v{version} with cgo (CPU only, symbols kept; several minutes)",
        ["go", "build", "-trimpath",
         f"-ldflags=-X={OLLAMA_MODULE}/version.Version={version}",
         "-o", str(partial), "."],
        log_path=log,
        progress=progress,
        fix="read the log; a missing C header means `apt-get install -y nlohmann-json3-dev libstb-dev`",
        cwd=src,
        env=_go_env(),
    )
    partial.replace(binary)
    return binary
