"""Ollama installed and run the ways users run it, for `tracer testbed up --layout`.

* ``plain`` (the default): ``ollama serve`` from the build cache, a child of the caller, logging to
  a file (``runtime.start_ollama``).
* ``system``: what the official Linux installer (``install.sh``) and its systemd unit make: the
  binary in ``PREFIX/bin/ollama``, its libraries in ``PREFIX/lib/ollama``, a system user
  ``ollama`` whose home ``/usr/share/ollama`` holds the models, the server running as that user
  in the unit's cgroup (``/system.slice/ollama.service``), its output in the journal
  (``journalctl -u ollama``). systemd itself is not run: ``testbed.supervisor`` starts the server
  and writes its lines through ``systemd-journal-remote``.
* ``container``: what ``docker run -p HOST:11434 ollama/ollama`` makes, without a Docker engine:
  the server in its own PID, mount and UTS namespaces (``unshare``), in its own root filesystem
  (``pivot_root``, as runc does) (the binary at ``/usr/bin/ollama``, libraries at ``/usr/lib/ollama``, which exist
  only inside it; the models in a bind-mounted volume), its output in a json-file log as Docker
  writes it, and the published port held by Docker's own userland forwarder, ``docker-proxy``
  (from Debian's ``docker.io`` package, unpacked, not installed). Its cgroup is the scope Docker's
  systemd driver makes (``/system.slice/docker-<id>.scope``), its log is where Docker keeps it
  (``/var/lib/docker/containers/<id>/<id>-json.log``). The network namespace is the
  host's (``--network host``-like on the inside): the forwarder reaches the server on a loopback
  port, where Docker's bridge would give it a container address.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ollama_tracer.errors import ExitCode, TracerError
from ollama_tracer.testbed.runtime import ManagedProcess, free_loopback_port, ollama_version
from ollama_tracer.testbed.steps import Progress, cache_dir, require_tool, run_step
from ollama_tracer.testbed.supervisor import machine_journal_dir

PLAIN, SYSTEM, CONTAINER = "plain", "system", "container"
LAYOUTS = (PLAIN, SYSTEM, CONTAINER)
DEFAULT_PREFIX = Path("/usr/local")
SERVICE_USER = "ollama"
SERVICE_HOME = Path("/usr/share/ollama")
UNIT = "ollama"
INSTALL_MARK = "lib/ollama/.installed-by-tracer-testbed"
CONTAINER_NAME = "tracer-ollama"
DOCKER_PROXY_PACKAGE = "docker.io"
DOCKER_CONTAINERS = Path("/var/lib/docker/containers")


def container_id_of(name: str) -> str:
    """A container id as Docker makes them: 64 hex digits (here: stable for the name)."""
    import hashlib

    return hashlib.sha256(f"tracer-testbed:{name}".encode()).hexdigest()


# ---------------------------------------------------------------------------------------- system


def install_system(release: Path, prefix: Path, progress: Progress) -> Path:
    """Copy a release tree (``bin/ollama``, ``lib/ollama/``) under ``prefix`` as install.sh does;
    refuse to overwrite an Ollama the testbed did not install. Returns the installed binary."""
    binary, libs = prefix / "bin" / "ollama", prefix / "lib" / "ollama"
    if binary.exists() and not (prefix / INSTALL_MARK).exists():
        raise TracerError(f"{binary} is an Ollama the testbed did not install; pass --prefix DIR to install "
                          "the system layout elsewhere.", ExitCode.USAGE)
    progress(f"installing Ollama into {prefix}/bin and {libs} (the official installer's layout)")
    binary.parent.mkdir(parents=True, exist_ok=True)
    if libs.exists():
        shutil.rmtree(libs)
    shutil.copytree(release / "lib" / "ollama", libs, symlinks=True)
    tmp = binary.with_suffix(".tmp")
    shutil.copy2(release / "bin" / "ollama", tmp)
    tmp.replace(binary)  # a running server keeps its old inode
    (prefix / INSTALL_MARK).write_text("tracer testbed up --layout system\n")
    return binary


def ensure_service_user(progress: Progress) -> None:
    """The installer's ``useradd -r -s /bin/false -U -m -d /usr/share/ollama ollama``."""
    if subprocess.run(["id", SERVICE_USER], capture_output=True, check=False).returncode == 0:
        return
    progress(f"creating the system user {SERVICE_USER} (home {SERVICE_HOME})")
    useradd = require_tool("useradd", "install Debian's passwd package")
    subprocess.run([useradd, "-r", "-s", "/bin/false", "-U", "-m", "-d", str(SERVICE_HOME), SERVICE_USER],
                   check=True, capture_output=True)


def start_system(binary: Path, directory: Path, progress: Progress, port: int | None = None,
                 timeout_s: float = 60.0) -> tuple[ManagedProcess, str, Path]:
    """``ollama serve`` as the ``ollama`` user, as ``ollama.service`` would run it. Returns the
    supervisor, the address, and the journal file its lines go to."""
    if not Path("/usr/lib/systemd/systemd-journal-remote").exists():
        raise TracerError("systemd-journal-remote is not installed; run `apt-get install systemd-journal-remote`.",
                          ExitCode.MISSING_DEPENDENCY)
    ensure_service_user(progress)
    port = port or free_loopback_port()
    host = f"http://127.0.0.1:{port}"
    journal = machine_journal_dir() / "ollama-testbed.journal"
    # The unit's Environment= lines (install.sh writes PATH) plus what the testbed needs.
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": str(SERVICE_HOME),
           "OLLAMA_HOST": f"127.0.0.1:{port}", "OLLAMA_DEBUG": "1", "OLLAMA_NOPRUNE": "1", "LANG": "C.UTF-8"}
    argv = [sys.executable, "-m", "ollama_tracer.testbed.supervisor", "--log-format", "journal",
            "--output", str(journal), "--unit", UNIT, "--user", SERVICE_USER,
            "--cgroup", f"system.slice/{UNIT}.service", "--",
            str(binary), "serve"]
    supervisor_log = directory / "ollama-system-supervisor.log"
    progress(f"starting {binary} serve as user {SERVICE_USER} on {host} (log: journalctl -u {UNIT})")
    return _wait_started(argv, env, supervisor_log, host, timeout_s), host, journal


# ------------------------------------------------------------------------------------- container


def _ldd_closure(elves: list[Path]) -> set[Path]:
    """The system libraries (and the loader) these ELF files need, by ldd."""
    needed: set[Path] = set()
    for elf in elves:
        out = subprocess.run(["ldd", str(elf)], capture_output=True, text=True, check=False).stdout
        for line in out.splitlines():
            parts = line.split()
            path = next((p for p in parts if p.startswith("/")), None)
            if path and not path.startswith(str(elf.parent)) and "/ollama" not in path:
                needed.add(Path(path))
    return needed


def build_rootfs(release: Path, rootfs: Path, progress: Progress) -> Path:
    """The image's filesystem: ``/usr/bin/ollama``, ``/usr/lib/ollama``, the C libraries they load,
    and empty mount points. Returns the rootfs (rebuilt when the release is newer)."""
    stamp = rootfs / ".built-from"
    source = f"rootfs-3 {(release / 'bin' / 'ollama').stat().st_mtime_ns}"  # bump when the layout changes
    if stamp.exists() and stamp.read_text() == source:
        return rootfs
    progress(f"building the container's root filesystem in {rootfs}")
    if rootfs.exists():
        shutil.rmtree(rootfs)
    (rootfs / "usr" / "bin").mkdir(parents=True)
    shutil.copy2(release / "bin" / "ollama", rootfs / "usr" / "bin" / "ollama")
    shutil.copytree(release / "lib" / "ollama", rootfs / "usr" / "lib" / "ollama", symlinks=True)
    (rootfs / "bin").mkdir()
    umount = Path(shutil.which("umount") or "/usr/bin/umount")
    shutil.copy2(umount, rootfs / "bin" / "umount")  # to let go of the host's root after pivot_root
    libs = [p for p in (rootfs / "usr" / "lib" / "ollama").iterdir()
            if p.is_file() and not p.is_symlink() and _is_elf(p)]
    elves = [rootfs / "bin" / "umount", rootfs / "usr" / "bin" / "ollama", *libs]
    for lib in _ldd_closure(elves):
        target = rootfs / lib.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib.resolve(), target)
    for name in ("proc", "dev", "sys", "tmp", "root/.ollama/models", "etc", ".oldroot"):
        (rootfs / name).mkdir(parents=True, exist_ok=True)
    (rootfs / "tmp").chmod(0o1777)
    (rootfs / "etc" / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    stamp.write_text(source)
    return rootfs


def _is_elf(path: Path) -> bool:
    with path.open("rb") as f:
        return f.read(4) == b"\x7fELF"


def docker_proxy(cache: Path, directory: Path, progress: Progress) -> Path:
    """Docker's userland forwarder, unpacked from Debian's docker.io package (the engine is not installed)."""
    target = cache / "docker-proxy" / "usr" / "sbin" / "docker-proxy"
    if target.exists():
        return target
    download = cache / "docker-proxy" / "deb"
    download.mkdir(parents=True, exist_ok=True)
    run_step(f"downloading Debian's {DOCKER_PROXY_PACKAGE} package for docker-proxy",
             ["apt-get", "download", DOCKER_PROXY_PACKAGE], log_path=directory / "docker-proxy-download.log",
             progress=progress, fix="check that Debian's package mirror is reachable", cwd=download)
    deb = next(download.glob(f"{DOCKER_PROXY_PACKAGE}_*.deb"))
    run_step("unpacking docker-proxy", ["dpkg-deb", "-x", str(deb), str(cache / "docker-proxy")],
             log_path=directory / "docker-proxy-download.log", progress=progress, fix="read the log")
    shutil.rmtree(download)
    return target


def start_container(release: Path, version: str, models: Path, directory: Path, progress: Progress,
                    port: int | None = None, timeout_s: float = 60.0) -> tuple[list[ManagedProcess], str, Path]:
    """The namespaced server and the forwarder that publishes it. Returns both processes (the
    container's supervisor first), the published address, and the container's json-file log."""
    cache = cache_dir()
    name = f"{CONTAINER_NAME}-{version}"
    rootfs = build_rootfs(release, directory / f"container-rootfs-{version}", progress)
    proxy = docker_proxy(cache, directory, progress)
    inner = free_loopback_port()
    port = port or free_loopback_port()
    models.mkdir(parents=True, exist_ok=True)
    # Where Docker keeps a container's log (json-file driver), under the id it names its cgroup by.
    container_id = container_id_of(name)
    log = DOCKER_CONTAINERS / container_id / f"{container_id}-json.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    # What runc does, in shell: private mounts, the volume, /dev and /sys, a proc of the new PID
    # namespace, then the image's entrypoint as PID 1 inside its root.
    # pivot_root, not chroot: the host then sees the server's files only through /proc/PID/root.
    # The root first (pivot_root needs a mount point), then what is mounted inside it.
    inside = ('set -e; r="$0"; mount --bind "$r" "$r"; mount --bind "$1" "$r/root/.ollama/models"; '
              'mount --rbind /dev "$r/dev"; mount --rbind /sys "$r/sys"; cd "$r"; mount -t proc proc proc; '
              'hostname "$2"; pivot_root . .oldroot; cd /; /bin/umount -l /.oldroot; exec /usr/bin/ollama serve')
    unshare = require_tool("unshare", "install util-linux")
    require_tool("pivot_root", "install util-linux")
    argv = [sys.executable, "-m", "ollama_tracer.testbed.supervisor", "--log-format", "json-file",
            "--output", str(log), "--cgroup", f"system.slice/docker-{container_id}.scope", "--",
            unshare, "--pid", "--mount", "--uts", "--fork", "--kill-child",
            "--propagation", "private", "sh", "-c", inside, str(rootfs), str(models), name]
    env = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "HOME": "/root",
           "OLLAMA_HOST": f"127.0.0.1:{inner}", "OLLAMA_DEBUG": "1", "OLLAMA_NOPRUNE": "1",
           "OLLAMA_MODELS": "/root/.ollama/models", "LANG": "C.UTF-8"}
    progress(f"starting the container {name} (PID and mount namespaces, root {rootfs}) "
             f"on 127.0.0.1:{inner}")
    container = _wait_started(argv, env, directory / f"container-supervisor-{version}.log", f"http://127.0.0.1:{inner}",
                              timeout_s)
    forward_argv = [str(proxy), "-proto", "tcp", "-host-ip", "127.0.0.1", "-host-port", str(port),
                    "-container-ip", "127.0.0.1", "-container-port", str(inner)]
    signal_file = directory / f"docker-proxy-{version}.signal"
    progress(f"publishing it on 127.0.0.1:{port} through docker-proxy")
    # docker-proxy reports readiness on fd 3 (dockerd passes a pipe); without one it would close its listener.
    forwarder = _wait_started(["sh", "-c", 'exec "$@" 3>>"$0"', str(signal_file), *forward_argv], None,
                              directory / f"docker-proxy-{version}.log", f"http://127.0.0.1:{port}", timeout_s,
                              record_argv=forward_argv)
    return [container, forwarder], f"http://127.0.0.1:{port}", log


def _wait_started(argv: list[str], env: dict[str, str] | None, log: Path, host: str, timeout_s: float,
                  record_argv: list[str] | None = None) -> ManagedProcess:
    with log.open("ab") as out:
        proc = subprocess.Popen(argv, env=env if env is not None else dict(os.environ), stdout=out,
                                stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
    managed = ManagedProcess(pid=proc.pid, argv=record_argv or argv, log=str(log))
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise TracerError(f"{Path(argv[0]).name} exited with code {proc.returncode} at start-up; read {log}.",
                              ExitCode.OLLAMA_UNREACHABLE)
        if ollama_version(host, timeout_s=0.5) is not None:
            return managed
        time.sleep(0.2)
    os.killpg(proc.pid, 15)
    raise TracerError(f"nothing answered on {host} within {timeout_s:.0f} s; read {log}.",
                      ExitCode.OLLAMA_UNREACHABLE)
