"""Build Ollama v0.13.5 from source through the Go module proxy (cgo, CPU, symbols kept).

``go install github.com/ollama/ollama@v0.13.5`` fails: module zips drop every file under a
nested ``vendor/`` directory, and four headers live in ``llama/llama.cpp/vendor/``. We copy the
module to a writable tree and put those headers back from packages this machine can reach:

* ``nlohmann/json.hpp`` and ``nlohmann/json_fwd.hpp`` from Debian's ``nlohmann-json3-dev``;
* ``stb/stb_image.h`` from Debian's ``libstb-dev``;
* ``miniaudio/miniaudio.h`` from llama-cpp-python's sdist on PyPI (its vendored llama.cpp).

The binary keeps its ELF symbols (no ``-s -w``) so the eBPF collector can attach uprobes by
name; ``-X version.Version`` makes ``/api/version`` report the real version.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed.steps import Progress, require_tool, run_step

OLLAMA_VERSION = "0.13.5"
OLLAMA_MODULE = "github.com/ollama/ollama"
LLAMA_CPP_PYTHON_SDIST = "llama-cpp-python==0.3.16"
_MINIAUDIO_IN_SDIST = "vendor/llama.cpp/vendor/miniaudio/miniaudio.h"
_DEBIAN_HEADERS = {
    "nlohmann/json.hpp": ("/usr/include/nlohmann/json.hpp", "nlohmann-json3-dev"),
    "nlohmann/json_fwd.hpp": ("/usr/include/nlohmann/json_fwd.hpp", "nlohmann-json3-dev"),
    "stb/stb_image.h": ("/usr/include/stb/stb_image.h", "libstb-dev"),
}


def ollama_binary_path(cache: Path, version: str = OLLAMA_VERSION) -> Path:
    return cache / "bin" / f"ollama-{version}"


def _go_env() -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("CGO_ENABLED", "1")
    env["GOFLAGS"] = "-mod=mod"
    env.setdefault("GOTOOLCHAIN", "local")
    return env


def _module_dir(cache: Path, progress: Progress) -> Path:
    log = cache / "logs" / "ollama-build.log"
    out = cache / "logs" / "ollama-mod-download.json"
    run_step(
        f"downloading {OLLAMA_MODULE}@v{OLLAMA_VERSION} from the Go module proxy",
        ["go", "mod", "download", "-json", f"{OLLAMA_MODULE}@v{OLLAMA_VERSION}"],
        log_path=log,
        progress=progress,
        fix="check that the Go module proxy is reachable (GOPROXY) and `go version` is >= 1.24",
        cwd=cache,
        env=_go_env(),
    )
    # `go mod download -json` prints its JSON on stdout, which run_step sent to the log;
    # ask again quietly (it is cached now) to read the directory.
    proc = subprocess.run(
        ["go", "mod", "download", "-json", f"{OLLAMA_MODULE}@v{OLLAMA_VERSION}"],
        cwd=cache,
        env=_go_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    out.write_text(proc.stdout)
    try:
        directory = Path(json.loads(proc.stdout)["Dir"])
    except (ValueError, KeyError) as err:
        raise TracerError(
            f"could not read the Ollama module directory from `go mod download` (see {out}); "
            "clear the module cache with `go clean -modcache` and retry.",
            ExitCode.BUILD_FAILED,
        ) from err
    return directory


def _miniaudio_header(cache: Path, progress: Progress) -> Path:
    header = cache / "headers" / "miniaudio" / "miniaudio.h"
    if header.exists():
        return header
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    if not list(downloads.glob("llama_cpp_python-*.tar.gz")):
        run_step(
            f"downloading miniaudio.h inside the {LLAMA_CPP_PYTHON_SDIST} sdist from PyPI",
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             LLAMA_CPP_PYTHON_SDIST, "-d", str(downloads)],
            log_path=cache / "logs" / "ollama-build.log",
            progress=progress,
            fix="check that PyPI is reachable (pip config, proxy)",
        )
    sdist = sorted(downloads.glob("llama_cpp_python-*.tar.gz"))[-1]
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


def build_ollama(cache: Path, progress: Progress) -> Path:
    """Return the path of a built ``ollama`` binary, building it only when it is missing."""
    binary = ollama_binary_path(cache)
    if binary.exists():
        return binary
    require_tool("go", "install Go >= 1.24 (https://go.dev/dl or `apt-get install golang`)")
    require_tool("gcc", "install a C toolchain with `apt-get install -y build-essential`")
    require_tool("g++", "install a C++ toolchain with `apt-get install -y build-essential`")
    module = _module_dir(cache, progress)
    src = cache / "src" / f"ollama-{OLLAMA_VERSION}"
    if src.exists():
        shutil.rmtree(src)
    shutil.copytree(module, src)
    for path in [src, *src.rglob("*")]:  # the module cache is read-only
        path.chmod(path.stat().st_mode | 0o200)
    _restore_vendor_headers(src, cache, progress)
    binary.parent.mkdir(parents=True, exist_ok=True)
    partial = binary.with_suffix(".partial")
    run_step(
        f"building Ollama v{OLLAMA_VERSION} with cgo (CPU only, symbols kept; several minutes)",
        ["go", "build", "-trimpath",
         f"-ldflags=-X={OLLAMA_MODULE}/version.Version={OLLAMA_VERSION}",
         "-o", str(partial), "."],
        log_path=cache / "logs" / "ollama-build.log",
        progress=progress,
        fix="read the log; a missing C header means `apt-get install -y nlohmann-json3-dev libstb-dev`",
        cwd=src,
        env=_go_env(),
    )
    partial.replace(binary)
    return binary
