"""Build an Ollama release that runs models in llama.cpp's ``llama-server`` (v0.30+), offline.

Since v0.30 Ollama's root ``CMakeLists.txt`` is a superbuild: it builds upstream llama.cpp's
``llama-server`` (plus Ollama's compat layer) into ``build/lib/ollama/`` and then runs a
stripped ``go build -s -w`` (the release form) into ``<src>/ollama``. It normally clones
llama.cpp from GitHub, which this machine cannot reach, so:

1. the Ollama module comes from the Go module proxy (copied out of the read-only module
   cache and made writable);
2. llama.cpp comes from the tree vendored in llama-cpp-python's sdist on PyPI
   (``vendor/llama.cpp``; its ``.git`` file is a dangling gitdir pointer and is deleted);
3. every ``llama/compat/**/*.patch`` is applied with ``git apply``: for a local tree
   (``OLLAMA_LLAMA_CPP_SOURCE``) the superbuild passes ``OLLAMA_LLAMA_CPP_SKIP_COMPAT_PATCH=ON``
   and applies nothing itself;
4. ``cmake -G Ninja`` with one CPU variant (AVX2/FMA/F16C/BMI2, no ``GGML_NATIVE``), then
   ``cmake --build``;
5. one more ``go build`` without ``-s -w``, so that the eBPF collector finds symbols.

The result is installed like an official Linux tarball, because Ollama looks for its
libraries in ``<exe>/../lib/ollama`` first::

    <cache>/ollama-VERSION/bin/ollama            symbols kept
    <cache>/ollama-VERSION/bin/ollama-stripped   the release form (-s -w)
    <cache>/ollama-VERSION/lib/ollama/           llama-server, libllama*.so, libggml*.so, ...

Everything is built under ``*.partial`` paths and renamed at the end, with a stamp, so an
interrupted build never leaves a tree that looks complete. The prepared sources (copied and
patched) are kept, so a rerun after an interruption resumes ninja where it stopped.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import sys
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path

from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed.ollama_build import OLLAMA_MODULE, OllamaBinaries, _go_env, writable_copy
from ollama_tracer.testbed.steps import Progress, require_tool, run_step
from ollama_tracer.vocabulary import LLAMA_SERVER

# The llama-cpp-python sdist whose vendored llama.cpp each Ollama version builds against.
# v0.34.4 pins llama.cpp b11081 (LLAMA_CPP_VERSION); 0.3.36's tree takes its compat patch.
LLAMA_CPP_PYTHON_FOR = {"0.34.4": "0.3.36"}
DEFAULT_LLAMA_CPP_PYTHON = "0.3.36"
STAMP_NAME = ".tracer-build.json"
_PREPARED_NAME = ".tracer-prepared"

# One CPU variant instead of GGML_CPU_ALL_VARIANTS (a dozen builds of ggml-cpu); no
# GGML_NATIVE, so the binaries also run on another x86-64-v3 machine.
CMAKE_CPU_FLAGS = (
    "-DGGML_CPU_ALL_VARIANTS=OFF",
    "-DGGML_AVX=ON",
    "-DGGML_AVX2=ON",
    "-DGGML_FMA=ON",
    "-DGGML_F16C=ON",
    "-DGGML_BMI2=ON",
)


def install_dir(cache: Path, version: str) -> Path:
    return cache / f"ollama-{version}"


def _stamp(version: str, sdist_version: str) -> dict[str, str]:
    return {"ollama": version, "llama_cpp_python": sdist_version, "layout": "bin+lib/ollama"}


def sdist_version_for(version: str) -> str:
    return os.environ.get("TRACER_LLAMA_CPP_PYTHON") or LLAMA_CPP_PYTHON_FOR.get(version, DEFAULT_LLAMA_CPP_PYTHON)


def built(cache: Path, version: str) -> OllamaBinaries | None:
    """The finished install of ``version``, or None when it is missing or incomplete."""
    root = install_dir(cache, version)
    symbols, stripped = root / "bin" / "ollama", root / "bin" / "ollama-stripped"
    try:
        recorded = json.loads((root / STAMP_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(recorded, dict) or recorded.get("ollama") != version:
        return None
    for path in (symbols, stripped, root / "lib" / "ollama" / LLAMA_SERVER):
        if not (path.is_file() and os.access(path, os.X_OK)):
            return None
    return OllamaBinaries(version=version, symbols=symbols, stripped=stripped)


@contextlib.contextmanager
def _lock(cache: Path, version: str) -> Iterator[None]:
    with (cache / f"ollama-{version}-build.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _sdist(cache: Path, sdist_version: str, log: Path, progress: Progress) -> Path:
    downloads = cache / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    sdist = downloads / f"llama_cpp_python-{sdist_version}.tar.gz"
    if not sdist.exists():
        run_step(
            f"downloading llama.cpp inside the llama-cpp-python=={sdist_version} sdist from PyPI (76 MB)",
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
             f"llama-cpp-python=={sdist_version}", "-d", str(downloads)],
            log_path=log,
            progress=progress,
            fix="check that PyPI is reachable (pip config, proxy)",
        )
    return sdist


def _extract_llama_cpp(sdist: Path, target: Path) -> Path:
    """Extract ``*/vendor/llama.cpp`` of the sdist to ``target`` (without its ``.git`` file)."""
    scratch = target.with_name(target.name + ".extract")
    if scratch.exists():
        shutil.rmtree(scratch)
    with tarfile.open(sdist) as tar:
        prefix = None
        members = []
        for member in tar.getmembers():
            parts = member.name.split("/")
            if len(parts) >= 3 and parts[1:3] == ["vendor", "llama.cpp"]:
                prefix = "/".join(parts[:3])
                members.append(member)
        if prefix is None:
            raise TracerError(f"{sdist.name} has no vendor/llama.cpp; delete {sdist} and retry.",
                              ExitCode.BUILD_FAILED)
        tar.extractall(scratch, members=members, filter="data")
    if target.exists():
        shutil.rmtree(target)
    (scratch / prefix).rename(target)
    shutil.rmtree(scratch)
    git_pointer = target / ".git"  # "gitdir: ../../.git/modules/..." that does not exist here
    if git_pointer.is_file() or git_pointer.is_symlink():
        git_pointer.unlink()
    elif git_pointer.is_dir():
        shutil.rmtree(git_pointer)
    return target


def compat_patches(src: Path) -> list[Path]:
    """Ollama's patches to llama.cpp, in the order they must be applied."""
    return sorted((src / "llama" / "compat").rglob("*.patch"))


def _prepare_sources(cache: Path, version: str, module: Path, sdist: Path, log: Path,
                     progress: Progress) -> tuple[Path, Path]:
    """The writable Ollama tree and the patched llama.cpp tree (reused when already prepared)."""
    work = cache / "src" / f"ollama-{version}-llama-server"
    src, llama_cpp = work / "ollama", work / "llama.cpp"
    marker = work / _PREPARED_NAME
    expected = json.dumps({"module": str(module), "sdist": sdist.name})
    if marker.is_file() and marker.read_text(encoding="utf-8") == expected and src.is_dir() and llama_cpp.is_dir():
        progress(f"reusing the prepared sources in {work} (an earlier build resumes where it stopped)")
        return src, llama_cpp
    if work.exists():
        shutil.rmtree(work)
    progress(f"copying the Ollama v{version} module and llama.cpp from {sdist.name} into {work}")
    writable_copy(module, src)
    _extract_llama_cpp(sdist, llama_cpp)
    git = require_tool("git", "applying Ollama's llama.cpp patches needs git (`apt-get install -y git`)")
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(work))  # never treat an enclosing repo as ours
    patches = compat_patches(src)
    for patch in patches:
        run_step(
            f"Ollama v{version}: applying {patch.relative_to(src)} to llama.cpp",
            [git, "apply", "--whitespace=nowarn", str(patch)],
            log_path=log,
            progress=progress,
            fix=(f"the llama.cpp tree in {sdist.name} does not match Ollama v{version}'s patch; "
                 "set TRACER_LLAMA_CPP_PYTHON to a llama-cpp-python version whose vendored llama.cpp "
                 "is closer to the one named in the module's LLAMA_CPP_VERSION"),
            cwd=llama_cpp,
            env=env,
        )
    marker.write_text(expected, encoding="utf-8")
    return src, llama_cpp


def _record_time(times: dict[str, float], name: str, started: float) -> None:
    times[name] = round(time.monotonic() - started, 1)


def build(cache: Path, version: str, module: Path, progress: Progress) -> OllamaBinaries:
    """Build Ollama ``version`` (a llama-server release) into :func:`install_dir`, once."""
    cache.mkdir(parents=True, exist_ok=True)
    with _lock(cache, version):
        done = built(cache, version)
        if done is not None:  # another process finished while we waited
            return done
        return _build_locked(cache, version, module, progress)


def _build_locked(cache: Path, version: str, module: Path, progress: Progress) -> OllamaBinaries:
    cmake = require_tool("cmake", "install CMake >= 3.24 with `apt-get install -y cmake`")
    require_tool("ninja", "install Ninja with `apt-get install -y ninja-build`")
    go = require_tool("go", "install Go >= 1.24 (https://go.dev/dl or `apt-get install golang`)")
    require_tool("gcc", "install a C toolchain with `apt-get install -y build-essential`")
    require_tool("g++", "install a C++ toolchain with `apt-get install -y build-essential`")
    log = cache / "logs" / f"ollama-{version}-build.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    times: dict[str, float] = {}
    started = time.monotonic()
    sdist_version = sdist_version_for(version)
    sdist = _sdist(cache, sdist_version, log, progress)
    t = time.monotonic()
    src, llama_cpp = _prepare_sources(cache, version, module, sdist, log, progress)
    _record_time(times, "prepare_sources_s", t)

    jobs = os.environ.get("TRACER_BUILD_JOBS") or str(os.cpu_count() or 2)
    env = _go_env()
    env["OLLAMA_LLAMA_CPP_SOURCE"] = str(llama_cpp)
    build_dir = src / "build"
    t = time.monotonic()
    run_step(
        f"Ollama v{version}: configuring the llama-server superbuild (cmake -G Ninja)",
        [cmake, "-B", str(build_dir), str(src), "-G", "Ninja", f"-DOLLAMA_VERSION={version}",
         f"-DOLLAMA_BUILD_PARALLEL={jobs}", *CMAKE_CPU_FLAGS],
        log_path=log,
        progress=progress,
        fix="read the log: the usual causes are a missing compiler or a llama.cpp tree Ollama does not expect",
        cwd=src,
        env=env,
    )
    _record_time(times, "configure_s", t)
    t = time.monotonic()
    progress(f"Ollama v{version}: the first compile takes about 12 minutes on 2 cores; a rerun after an "
             "interruption resumes it")
    run_step(
        f"Ollama v{version}: compiling llama-server, ggml and the stripped Go binary ({jobs} jobs)",
        [cmake, "--build", str(build_dir)],
        log_path=log,
        progress=progress,
        fix="read the log for the first error (compiler, disk space); a rerun resumes the build",
        cwd=src,
        env=env,
        ninja_progress=True,
    )
    _record_time(times, "compile_s", t)

    root = install_dir(cache, version)
    partial = root.with_name(root.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    (partial / "bin").mkdir(parents=True)
    released = src / "ollama"
    if not released.is_file():
        raise TracerError(
            f"Ollama v{version}: the superbuild finished without writing {released}; read {log} and rerun.",
            ExitCode.BUILD_FAILED,
        )
    shutil.copy2(released, partial / "bin" / "ollama-stripped")
    t = time.monotonic()
    ldflags = f"-X={OLLAMA_MODULE}/version.Version={version} -X={OLLAMA_MODULE}/server.mode=release"
    go_env = dict(env, CGO_ENABLED="1")
    run_step(
        f"Ollama v{version}: go build with symbols (no -s -w) for the eBPF collector",
        [go, "build", "-trimpath", "-ldflags", ldflags, "-o", str(partial / "bin" / "ollama"), "."],
        log_path=log,
        progress=progress,
        fix="read the log for the Go error",
        cwd=src,
        env=go_env,
    )
    _record_time(times, "go_build_symbols_s", t)
    libs = build_dir / "lib" / "ollama"
    if not (libs / LLAMA_SERVER).is_file():
        raise TracerError(
            f"Ollama v{version}: the superbuild left no {libs / 'llama-server'}; read {log} and rerun.",
            ExitCode.BUILD_FAILED,
        )
    shutil.copytree(libs, partial / "lib" / "ollama", symlinks=True)
    _record_time(times, "total_s", started)
    stamp: dict[str, object] = {**_stamp(version, sdist_version), "build_times_s": times}
    (partial / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n", encoding="utf-8")
    if root.exists():
        shutil.rmtree(root)
    partial.rename(root)
    progress(f"built Ollama v{version} into {root} in {times['total_s']:.0f} s "
             f"(configure {times['configure_s']:.0f} s, compile {times['compile_s']:.0f} s, "
             f"go build with symbols {times['go_build_symbols_s']:.0f} s)")
    result = built(cache, version)
    if result is None:
        raise TracerError(f"Ollama v{version}: the install in {root} is incomplete; delete it and rerun.",
                          ExitCode.BUILD_FAILED)
    return result

