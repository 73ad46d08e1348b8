"""Where Ollama runs, without Ollama: the journal log source against real journal files (written by
systemd-journal-remote, read by journalctl), Docker's json-file lines, the testbed's supervisor,
and following a port through a real forwarder (socat) to the process behind it."""

from __future__ import annotations

import http.server
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from ollama_tracer import deployment
from ollama_tracer.capture_files import OLLAMA_LOG
from ollama_tracer.clock import ClockModel
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.journald import JournaldCollector, message_of
from ollama_tracer.collectors.ollama_log import OllamaLogCollector, unwrap_json_file
from ollama_tracer.testbed.supervisor import JOURNAL_REMOTE, journal_entry, json_file_line

BOUNDARY = 'time=2026-12-02T10:00:00.123Z level=DEBUG source=server.go:1 msg="completion request" n=1'
PROMPT = 'time=2026-12-02T10:00:00.124Z level=TRACE source=server.go:2 msg="prompt" text="my secret prompt"'
needs_journal = pytest.mark.skipif(not (Path(JOURNAL_REMOTE).exists() and shutil.which("journalctl")),
                                   reason="systemd-journal-remote and journalctl are installed by scripts/bootstrap.sh")


class Journal:
    """A journal directory fed entry by entry through systemd-journal-remote, as the testbed's
    system layout does."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.proc = subprocess.Popen([JOURNAL_REMOTE, f"--output={directory / 'test.journal'}", "-"],
                                     stdin=subprocess.PIPE, stderr=subprocess.DEVNULL)
        self.boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip().replace("-", "")

    def write(self, message: str, unit: str = "ollama") -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(journal_entry(message, unit=unit, pid=4242, uid=0, comm="ollama", boot_id=self.boot,
                                            stream_fd=2))
        self.proc.stdin.flush()

    def settle(self, count: int, unit: str = "ollama.service") -> None:
        """Wait until journalctl reads ``count`` entries of ``unit``."""
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            out = subprocess.run(["journalctl", "--directory", str(self.directory), "--unit", unit, "--output",
                                  "json", "--no-pager", "--quiet"], capture_output=True, text=True, check=False)
            if len(out.stdout.splitlines()) >= count:
                return
            time.sleep(0.05)
        raise AssertionError(f"journalctl never showed {count} entries")

    def close(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(timeout=10)


def _session(tmp: Path) -> SessionInfo:
    (tmp / "raw").mkdir(exist_ok=True)
    return SessionInfo(directory=tmp, clock=ClockModel.measure())


@needs_journal
def test_the_journal_source_keeps_what_the_unit_logged_during_the_capture_and_nothing_private(tmp_path: Path) -> None:
    (tmp_path / "journal").mkdir()
    journal = Journal(tmp_path / "journal")
    try:
        journal.write("before the capture " + BOUNDARY)
        journal.write(BOUNDARY, unit="other")  # another unit's line, with the same text
        journal.settle(1)
        collector = JournaldCollector("ollama", directory=tmp_path / "journal")
        assert collector.available() == (True, "")
        capture = tmp_path / "capture"
        capture.mkdir()
        collector.start(_session(capture))
        journal.write(BOUNDARY)
        journal.write(PROMPT)
        journal.write("line one\nline two of one entry")  # a message with a newline: the binary field form
        journal.settle(4)
        stats = collector.stop()
    finally:
        journal.close()
    kept = (capture / OLLAMA_LOG).read_text()
    assert kept.splitlines() == [BOUNDARY], kept
    assert stats["entries"] == 3 and stats["lines_left_out_for_privacy"] == 2, stats
    assert stats["cursor"] == "after"
    assert "secret" not in kept


@needs_journal
def test_the_journal_source_says_why_when_the_unit_has_no_lines(tmp_path: Path) -> None:
    journal = Journal(tmp_path)
    try:
        journal.write(BOUNDARY)
        journal.settle(1)
    finally:
        journal.close()
    ok, why = JournaldCollector("ollama-typo", directory=tmp_path).available()
    assert not ok and "ollama-typo.service" in why and "systemctl status" in why


def test_a_message_journalctl_prints_as_bytes_is_read_back() -> None:
    assert message_of({"MESSAGE": [104, 105, 255]}) == b"hi\xff"
    assert message_of({"MESSAGE": "hi"}) == b"hi"
    assert message_of({}) is None


def test_docker_json_file_lines_are_unwrapped_and_filtered_like_a_plain_log(tmp_path: Path) -> None:
    log = tmp_path / "c-json.log"
    log.write_bytes(b"")
    collector = OllamaLogCollector(log)
    capture = tmp_path / "capture"
    capture.mkdir()
    collector.start(_session(capture))
    with log.open("ab") as out:
        out.write(json_file_line(BOUNDARY, "stderr"))
        out.write(json_file_line(PROMPT, "stderr"))
        out.write(b'{"log": broken\n')  # a torn line stays as it is (and is then left out)
    stats = collector.stop()
    assert (capture / OLLAMA_LOG).read_text().splitlines() == [BOUNDARY]
    assert stats["lines_left_out_for_privacy"] == 2
    assert unwrap_json_file(b"plain line\n") == b"plain line\n"
    line = json.loads(json_file_line("x", "stdout"))
    assert line["log"] == "x\n" and line["stream"] == "stdout" and line["time"].endswith("Z")


@needs_journal
def test_the_supervisor_carries_a_commands_output_into_the_journal_and_waits_for_it(tmp_path: Path) -> None:
    journal = tmp_path / "j" / "s.journal"
    code = subprocess.run([sys.executable, "-m", "ollama_tracer.testbed.supervisor", "--log-format", "journal",
                           "--output", str(journal), "--unit", "tracer-test", "--", "sh", "-c",
                           "echo out; echo err >&2; exit 3"], timeout=60, check=False).returncode
    assert code == 3  # the command's own exit code
    out = subprocess.run(["journalctl", "--file", str(journal), "--unit", "tracer-test", "--output", "json",
                          "--no-pager"], capture_output=True, text=True, check=True).stdout
    entries = [json.loads(line) for line in out.splitlines()]
    assert sorted(e["MESSAGE"] for e in entries) == ["err", "out"]
    assert {e["_SYSTEMD_UNIT"] for e in entries} == {"tracer-test.service"}
    assert {e["PRIORITY"] for e in entries if e["MESSAGE"] == "err"} == {"3"}


def test_cgroup_lines_name_the_unit_or_the_container() -> None:
    assert deployment.UNIT_CGROUP.search("/system.slice/ollama.service")["unit"] == "ollama"  # type: ignore[index]
    assert deployment.UNIT_CGROUP.search("/user.slice/user-0.slice/session-1.scope") is None
    docker_id = "5ef9875fd5cf051b4bda4cf011ba7f0af5b37c6445a805e214b96bfe80fad2bd"
    for path in (f"/system.slice/docker-{docker_id}.scope", f"/docker/{docker_id}"):
        assert deployment.CONTAINER_CGROUP.search(path)["id"] == docker_id  # type: ignore[index]


def test_this_process_is_a_plain_one() -> None:
    found = deployment.detect(os.getpid())
    assert found.root is None and found.pid_inside is None
    assert found.kind in (deployment.PLAIN, deployment.SERVICE)  # a CI job may itself run in a unit


class _Version(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        body = b'{"version":"0.0.0"}'
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.skipif(shutil.which("socat") is None, reason="socat is installed by scripts/bootstrap.sh")
def test_a_port_is_followed_through_a_forking_forwarder_to_the_process_behind_it() -> None:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Version)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        published = probe.getsockname()[1]
    socat = subprocess.Popen(["socat", f"TCP-LISTEN:{published},bind=127.0.0.1,fork,reuseaddr",
                              f"TCP:127.0.0.1:{server.server_address[1]}"])
    try:
        deadline = time.monotonic() + 10
        while deployment.pid_listening_on(published) is None:
            assert time.monotonic() < deadline and socat.poll() is None
            time.sleep(0.05)
        behind, forwarder = deployment.follow(published)
        assert behind == os.getpid()  # this test's own HTTP server is the process behind socat
        assert forwarder is not None and forwarder.pid == socat.pid and forwarder.name == "socat"
        assert forwarder.how == "connection" and forwarder.target.port == server.server_address[1]
        assert forwarder.published_port == published
    finally:
        socat.terminate()
        socat.wait(timeout=10)
        server.shutdown()


def test_a_port_nobody_forwards_is_its_own_listener() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        port = listener.getsockname()[1]
        # this process is no Ollama and no docker-proxy: it is asked where it connects onward, and
        # with no onward connection it is the answer itself
        assert deployment.follow(port) == (os.getpid(), None)


def test_a_versioned_ollama_binary_is_ollama_and_never_a_forwarder(tmp_path: Path) -> None:
    """The testbed's plain v0.13.5 runs as ``ollama-0.13.5``: taken for a forwarder, its runner
    connection was "followed" and the runner traced as the server (CI, stop 25)."""
    for name, expected in (("ollama-0.13.5", True), ("socat-like", False)):
        binary = tmp_path / name
        shutil.copy("/bin/sleep", binary)
        proc = subprocess.Popen([str(binary), "30"])
        try:
            assert deployment.is_ollama(proc.pid) is expected, name
        finally:
            proc.kill()
            proc.wait()
