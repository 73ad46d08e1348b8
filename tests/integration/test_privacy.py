"""No prompt or completion text anywhere in a capture unless --record-content; user-only files;
loopback-only listeners. Every collector that runs here is on (eBPF, log, py-spy, client spans)."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.netstat import LISTEN, socket_fds, tcp_rows

from tests.conftest import REPO, run_tracer_healing

pytestmark = pytest.mark.integration
LOOPBACK = ("0100007F", "00000000000000000000000001000000", "0000000000000000FFFF00000100007F")
PROMPT = "quokka-zebra-7731 tell me about the private ledger"


def _capture(testbed: dict[str, Any], out: Path, *flags: str) -> str:
    """Capture a script that sends PROMPT (streamed, interrupted, then again); returns the completion."""
    completion = out.parent / f"{out.name}-completion.txt"
    script = out.parent / f"{out.name}-app.py"
    script.write_text(textwrap.dedent(f"""
        import ollama, pathlib
        client = ollama.Client(host={testbed["ollama_host"]!r}, timeout=30)
        stream = client.generate(model="tracer-llama:test", prompt={PROMPT!r}, stream=True)
        for i, part in enumerate(stream):
            if i == 5:
                break
        stream.close()
        text = "".join(p["response"] for p in client.generate(model="tracer-llama:test", prompt={PROMPT!r},
                                                              stream=True, options={{"num_predict": 12}}))
        pathlib.Path({str(completion)!r}).write_text(text)
    """))
    proc = run_tracer_healing(testbed, "capture", "-o", str(out), "--force", "--ollama-host", testbed["ollama_host"],
                              *flags, "--", sys.executable, str(script), timeout=300)
    assert proc.returncode == 0, proc.stderr
    return completion.read_text()


def _files(directory: Path) -> list[Path]:
    return [p for p in directory.rglob("*") if p.is_file()]


def _containing(directory: Path, needle: str) -> list[str]:
    found = []
    for path in _files(directory):
        data = path.read_bytes()
        # Also JSON-escaped forms: a prompt inside a JSON string keeps its text, but check both.
        if needle.encode() in data or json.dumps(needle)[1:-1].encode() in data:
            found.append(str(path.relative_to(directory)))
    return found


def _distinctive(completion: str) -> list[str]:
    """The answer's words that no capture file can hold by chance: 6 characters or more, with a
    digit and a character that is not a hex digit (the synthetic vocabulary's ``w000391``). A plain
    word can be a span's own text (once seen: the answer had a word the spans also hold, likely
    a finish reason such as ``length``), and a hex or digit run can be part of an id or a time."""
    return [piece for piece in completion.split()
            if len(piece) >= 6 and any(c.isdigit() for c in piece)
            and any(c not in "0123456789abcdefABCDEF" for c in piece)]


def test_no_prompt_or_completion_anywhere_without_record_content(testbed: dict[str, Any], tmp_path: Path) -> None:
    out = tmp_path / "cap"
    completion = _capture(testbed, out)
    meta = json.loads((out / "capture.json").read_text())
    ran = {name for name, status in meta["collectors"].items() if status["ran"]}
    assert {"ebpf", "ollama_log", "client_spans", "pyspy"} <= ran, meta["collectors"]
    assert len(_files(out)) >= 10  # raw/ holds every collector's output
    assert _containing(out, PROMPT) == []
    assert _containing(out, "quokka-zebra") == []
    pieces = _distinctive(completion)
    assert pieces, completion  # the synthetic model's answer always has some
    leaked = {piece: found for piece in pieces if (found := _containing(out, piece))}
    assert not leaked, leaked
    # Files are user-only, directories too.
    for path in [out, *out.rglob("*")]:
        mode = stat.S_IMODE(path.stat().st_mode)
        assert mode & 0o077 == 0, (str(path), oct(mode))
    # The opt-in records it: the grep above can fail.
    opted = tmp_path / "opted"
    answer = _capture(testbed, opted, "--record-content")
    assert _containing(opted, PROMPT), "with --record-content the prompt is in the spans"
    assert all(_containing(opted, piece) for piece in _distinctive(answer)), "and the answer's words too"


def test_listeners_bind_loopback_only(testbed: dict[str, Any], tmp_path: Path) -> None:
    """While a capture runs, every socket the tracer listens on is a loopback one."""
    out = tmp_path / "cap"
    proc = subprocess.Popen([sys.executable, "-m", "ollama_tracer", "capture", "-o", str(out), "--ollama-host",
                             testbed["ollama_host"], "--", sys.executable, "-c", "import time; time.sleep(6)"],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = 60
        started = time.monotonic()
        inodes: set[str] = set()
        while time.monotonic() - started < deadline and len(inodes) < 2:
            time.sleep(0.5)
            held = set(socket_fds(proc.pid).values())
            inodes = {r.inode for r in tcp_rows() if r.state == LISTEN and r.inode in held}
        assert len(inodes) >= 2, "the OTLP receiver's gRPC and HTTP ports"
        for table in ("/proc/net/tcp", "/proc/net/tcp6"):
            for line in Path(table).read_text().splitlines()[1:]:
                fields = line.split()
                if fields[9] in inodes:
                    # 127.0.0.1, ::1, or 127.0.0.1 mapped into IPv6 (gRPC's listener)
                    assert fields[1].rsplit(":", 1)[0] in LOOPBACK, line
    finally:
        proc.communicate(timeout=120)
    assert proc.returncode == 0
