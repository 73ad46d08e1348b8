"""Ollama's log from the systemd journal, for a server run as a unit (the official Linux install).

``journalctl`` is the reader (the journal's file format is systemd's own; its maintained
reader is the one it ships): when the capture starts the collector takes the journal's cursor
for the unit (``journalctl --unit U --lines 0 --show-cursor``), and when it stops it reads
what came after (``--after-cursor C --output json``) and writes each entry's ``MESSAGE`` into
``raw/ollama.log``, the file collector's raw file, so attribution reads both the same way.
Nothing runs while the workload does. Each line's time is the one the server wrote into it, as
with a file; journald's receipt time (``__REALTIME_TIMESTAMP``) is not used.

The journal can lose lines the file would not: journald rate-limits a unit
(``RateLimitBurst``, 10 000 lines per 30 s by default; OLLAMA_DEBUG=2 can pass that); a
"Suppressed N messages" entry is counted as ``suppressed``.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

from ollama_tracer import capture_files
from ollama_tracer.capture_files import OLLAMA_LOG
from ollama_tracer.collectors.base import SessionInfo
from ollama_tracer.collectors.ollama_log import copy_lines

CURSOR = re.compile(r"^-- cursor: (?P<cursor>\S+)", re.MULTILINE)
SUPPRESSED = re.compile(r"Suppressed (?P<n>\d+) messages from ")
SETTLE_S = 0.3  # journald writes a line a few ms after the server does: read until nothing new comes


def journalctl_path() -> str | None:
    return shutil.which("journalctl")


def unit_name(unit: str) -> str:
    return unit if "." in unit else f"{unit}.service"


def message_of(entry: dict[str, Any]) -> bytes | None:
    """An entry's MESSAGE as bytes; journalctl writes a non-UTF-8 one as a list of byte values."""
    value = entry.get("MESSAGE")
    if isinstance(value, str):
        return value.encode("utf-8")
    if isinstance(value, list) and all(isinstance(b, int) for b in value):
        return bytes(value)
    return None


class JournaldCollector:
    name = "ollama_log"  # the same evidence as the file collector: one or the other runs

    def __init__(self, unit: str, record_content: bool = False, timeout_s: float = 30.0,
                 directory: Path | None = None) -> None:
        self.unit = unit_name(unit)
        self.directory = directory  # journalctl --directory: a journal other than this machine's
        self.record_content = record_content
        self.timeout_s = timeout_s
        self._cursor: str | None = None
        self._since_us = 0
        self._session: SessionInfo | None = None

    def _journalctl(self, *args: str) -> subprocess.CompletedProcess[str]:
        where = ["--directory", str(self.directory)] if self.directory else []
        return subprocess.run([journalctl_path() or "journalctl", *where, "--unit", self.unit, "--no-pager", "--quiet",
                               *args], capture_output=True, text=True, timeout=self.timeout_s, check=False)

    def available(self) -> tuple[bool, str]:
        if journalctl_path() is None:
            return False, "journalctl is not installed; install it (Debian: `apt-get install systemd`)"
        try:
            out = self._journalctl("--lines", "1", "--output", "json")
        except subprocess.TimeoutExpired:
            return False, f"journalctl did not answer within {self.timeout_s:.0f} s"
        if out.returncode != 0:
            return False, f"journalctl --unit {self.unit} failed: {out.stderr.strip()[:200]}"
        if not out.stdout.strip():
            return False, (f"the journal has no lines of {self.unit}; check the unit's name (`systemctl status "
                           "ollama`) and that this user may read the journal (root, or group systemd-journal)")
        return True, ""

    def start(self, session: SessionInfo) -> None:
        self._session = session
        self._since_us = time.time_ns() // 1000
        out = self._journalctl("--lines", "0", "--show-cursor")
        found = CURSOR.search(out.stdout)
        self._cursor = found["cursor"] if found else None

    def child_started(self, pid: int) -> None:
        pass

    def _entries(self) -> list[dict[str, Any]]:
        where = ["--after-cursor", self._cursor] if self._cursor else ["--since", f"@{self._since_us / 1e6:.6f}"]
        out = self._journalctl(*where, "--output", "json")
        entries = []
        for line in out.stdout.splitlines():
            try:
                entry = json.loads(line)
            except ValueError:
                continue
            if isinstance(entry, dict):
                entries.append(entry)
        return entries

    def stop(self) -> dict[str, Any]:
        assert self._session is not None
        entries = self._entries()
        deadline = time.monotonic() + 5 * SETTLE_S
        while time.monotonic() < deadline:  # the lines of the workload's last moments may still be on their way
            time.sleep(SETTLE_S)
            more = self._entries()
            if len(more) == len(entries):
                break
            entries = more
        messages, suppressed = [], 0
        for entry in entries:
            message = message_of(entry)
            if message is None:
                continue
            found = SUPPRESSED.search(message.decode("utf-8", errors="replace"))
            if found:
                suppressed += int(found["n"])
            messages.append(message.rstrip(b"\n") + b"\n")
        target = self._session.directory / OLLAMA_LOG
        with capture_files.open_private(target, "wb") as out:
            dropped = copy_lines(messages, out, self.record_content)
        return {"unit": self.unit, "entries": len(messages), "bytes": target.stat().st_size,
                "lines_left_out_for_privacy": dropped, "suppressed": suppressed,
                "cursor": "after" if self._cursor else "since"}
