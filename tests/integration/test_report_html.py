"""report.html from a real capture, opened in a real headless Chromium with the network cut off.

Checks what only a browser can: the page paints (a screenshot that is not blank), the script ran
and every phase of every interval is in the live DOM, the zoom works, and not one request left
the page (Chrome DevTools Protocol: every request the page made, and every error it logged).
"""

from __future__ import annotations

import json
import struct
import subprocess
import sys
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from tests.conftest import run_tracer, run_tracer_healing
from tests.unit.test_html import assert_every_phase_drawn, waterfalls_of

websocket = pytest.importorskip("websocket", reason="websocket-client is a dev extra: pip install -e '.[dev]'")

pytestmark = pytest.mark.integration

CHROMIUM = "/usr/bin/chromium"
# Headless, and nowhere to go: every proxy connection and every name lookup fails.
OFFLINE_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
                 "--proxy-server=127.0.0.1:9", "--host-resolver-rules=MAP * ~NOTFOUND")
BROWSER_TIMEOUT_S = 120  # two slow cores: Chromium alone takes seconds to start
SETTLE_S = 2.0  # after the load event, time for a timer-delayed request to show up


@pytest.fixture(scope="module")
def capture(testbed: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """One real capture of the interrupt benchmark (2 iterations), shared by this module's tests."""
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing: `apt-get install -y --no-install-recommends chromium` "
                    "(scripts/bootstrap.sh installs it)")
    out = tmp_path_factory.mktemp("report_html") / "cap"
    proc = run_tracer_healing(
        testbed, "capture", "-o", str(out), "--force", "--ollama-host", testbed["ollama_host"], "--",
        sys.executable, "-m", "ollama_tracer", "bench", "interrupt", "--host", testbed["ollama_host"],
        "--model", "tracer-llama:test", "--iterations", "2", "--request-timeout", "30",
        timeout=300, env={"OLLAMA_HOST": testbed["ollama_host"]})
    assert proc.returncode == 0, proc.stderr
    assert "report.html" in proc.stdout  # listed among the files the capture wrote
    yield out


def _attribution(capture: Path) -> dict[str, Any]:
    attribution: dict[str, Any] = json.loads((capture / "attribution.json").read_text())
    assert attribution["intervals"], "the benchmark produced no interval"
    return attribution


def _chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CHROMIUM, *OFFLINE_FLAGS, f"--user-data-dir={profile}", *args], capture_output=True,
                          text=True, timeout=BROWSER_TIMEOUT_S, check=False)


def png_colours(path: Path, limit: int = 1000) -> tuple[int, int, int]:
    """(width, height, distinct colours up to ``limit``) of an 8-bit RGB/RGBA PNG, with the stdlib.

    Rows are unfiltered as the PNG spec says (None, Sub, Up, Average, Paeth).
    """
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    position, compressed = 8, bytearray()
    width = height = channels = 0
    while position < len(data):
        length, kind = struct.unpack(">I4s", data[position:position + 8])
        body = data[position + 8:position + 8 + length]
        position += 12 + length
        if kind == b"IHDR":
            width, height, depth, colour_type = struct.unpack(">IIBB", body[:10])
            assert depth == 8 and colour_type in (2, 6), f"unexpected PNG format {depth}/{colour_type}"
            channels = 3 if colour_type == 2 else 4
        elif kind == b"IDAT":
            compressed += body
    raw = zlib.decompress(bytes(compressed))
    stride = width * channels
    previous = bytearray(stride)
    colours: set[bytes] = set()
    for row_number in range(height):
        start = row_number * (stride + 1)
        kind, row = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        for i in range(stride):
            left = row[i - channels] if i >= channels else 0
            up = previous[i]
            if kind == 1:
                row[i] = (row[i] + left) & 0xFF
            elif kind == 2:
                row[i] = (row[i] + up) & 0xFF
            elif kind == 3:
                row[i] = (row[i] + (left + up) // 2) & 0xFF
            elif kind == 4:
                up_left = previous[i - channels] if i >= channels else 0
                estimate = left + up - up_left
                pa, pb, pc = abs(estimate - left), abs(estimate - up), abs(estimate - up_left)
                row[i] = (row[i] + (left if pa <= pb and pa <= pc else up if pb <= pc else up_left)) & 0xFF
        if len(colours) < limit and row_number % 8 == 0:  # every 8th row is plenty to tell blank from drawn
            colours.update(bytes(row[i:i + 3]) for i in range(0, stride, channels))
        previous = row
    return width, height, len(colours)


def test_report_paints(capture: Path, tmp_path: Path) -> None:
    screenshot = tmp_path / "report.png"
    proc = _chromium(tmp_path / "profile", f"--screenshot={screenshot}", "--window-size=1400,2000",
                     "--hide-scrollbars", (capture / "report.html").as_uri())
    assert screenshot.exists(), proc.stderr[-2000:]
    width, height, colours = png_colours(screenshot)
    print(f"\nscreenshot of the report: {screenshot}")
    assert (width, height) == (1400, 2000)
    assert colours > 16, f"the screenshot looks blank ({colours} colours)"


def test_every_phase_is_in_the_live_dom(capture: Path, tmp_path: Path) -> None:
    proc = _chromium(tmp_path / "profile", "--dump-dom", "--virtual-time-budget=3000",
                     (capture / "report.html").as_uri())
    assert proc.returncode == 0, proc.stderr[-2000:]
    dom = proc.stdout
    attribution = _attribution(capture)
    assert_every_phase_drawn(dom, attribution)
    assert set(waterfalls_of(dom)) == {str(interval["index"]) for interval in attribution["intervals"]}
    # The script ran: it drew each waterfall's time axis from the JSON island.
    assert dom.count("class=\"tick\"") >= 2 * len(attribution["intervals"])


def test_report_command_rewrites_it(capture: Path, tmp_path: Path) -> None:
    target = tmp_path / "again.html"
    proc = run_tracer("report", str(capture), "--format", "html", "-o", str(target), timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"Wrote {target}. Open it in a browser (it needs no network)."
    assert target.stat().st_mode & 0o077 == 0
    assert_every_phase_drawn(target.read_text(encoding="utf-8"), _attribution(capture))


class DevTools:
    """A Chrome DevTools Protocol session on one page of a headless Chromium (flattened sessions)."""

    def __init__(self, profile: Path) -> None:
        self.browser = subprocess.Popen([CHROMIUM, *OFFLINE_FLAGS, "--remote-debugging-port=0",
                                         f"--user-data-dir={profile}", "about:blank"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        port_file = profile / "DevToolsActivePort"
        deadline = time.monotonic() + BROWSER_TIMEOUT_S
        lines: list[str] = []
        while len(lines) < 2:
            assert time.monotonic() < deadline, "Chromium did not open its DevTools port"
            assert self.browser.poll() is None, f"Chromium exited with {self.browser.returncode}"
            time.sleep(0.1)
            lines = port_file.read_text().splitlines() if port_file.exists() else []
        self.socket = websocket.create_connection(f"ws://127.0.0.1:{lines[0]}{lines[1]}", timeout=60,
                                                  suppress_origin=True)
        self.events: list[dict[str, Any]] = []
        self._next_id = 0
        target = self.call("Target.createTarget", url="about:blank")["targetId"]
        self.session: str | None = self.call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]

    def call(self, method: str, **params: Any) -> dict[str, Any]:
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params}
        if getattr(self, "session", None):
            message["sessionId"] = self.session
        self.socket.send(json.dumps(message))
        while True:
            reply = json.loads(self.socket.recv())
            if reply.get("id") == self._next_id:
                assert "error" not in reply, f"{method}: {reply['error']}"
                result: dict[str, Any] = reply.get("result", {})
                return result
            self.events.append(reply)

    def collect(self, until_event: str, then_s: float) -> None:
        """Record events until ``until_event`` arrives, and for ``then_s`` seconds after it."""
        deadline, settle_until = time.monotonic() + BROWSER_TIMEOUT_S, None
        while settle_until is None or time.monotonic() < settle_until:
            assert time.monotonic() < deadline, f"no {until_event}"
            self.socket.settimeout(0.2 if settle_until else max(0.1, deadline - time.monotonic()))
            try:
                event = json.loads(self.socket.recv())
            except websocket.WebSocketTimeoutException:  # nothing more arrived yet
                continue
            self.events.append(event)
            if settle_until is None and event.get("method") == until_event:
                settle_until = time.monotonic() + then_s
        self.socket.settimeout(60)

    def evaluate(self, expression: str) -> Any:
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        assert "exceptionDetails" not in result, result["exceptionDetails"]
        return result["result"].get("value")

    def close(self) -> None:
        self.socket.close()
        self.browser.terminate()
        try:
            self.browser.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.browser.kill()
            self.browser.wait()


def test_no_request_leaves_the_page(capture: Path, tmp_path: Path) -> None:
    report = capture / "report.html"
    url = report.as_uri()
    browser = DevTools(tmp_path / "profile")
    try:
        for domain in ("Network", "Page", "Runtime", "Log"):
            browser.call(f"{domain}.enable")
        browser.call("Page.navigate", url=url)
        browser.collect("Page.loadEventFired", then_s=SETTLE_S)
        # Zoom in with the mouse wheel on the first waterfall, then reset with its button.
        zoom = browser.evaluate("""(() => {
            const w = document.querySelector('.waterfall[data-interval]');
            const before = parseFloat(w.style.getPropertyValue('--view-ms'));
            const r = w.querySelector('.plot').getBoundingClientRect();
            w.dispatchEvent(new WheelEvent('wheel', {deltaY: -120, clientX: r.left + r.width / 2,
                                                     clientY: r.top + 10, bubbles: true, cancelable: true}));
            const zoomed = parseFloat(w.style.getPropertyValue('--view-ms'));
            document.querySelector('.zoom button[data-zoom="reset"]').click();
            return [before, zoomed, parseFloat(w.style.getPropertyValue('--view-ms'))];
        })()""")
    finally:
        browser.close()
    requested = [e["params"]["request"]["url"] for e in browser.events
                 if e.get("method") == "Network.requestWillBeSent"]
    assert url in requested, f"DevTools saw no request for the page itself: {requested}"
    for seen in requested:
        assert seen == url or urlsplit(seen).scheme in ("data", "about"), f"the report requested {seen}"
    failed = [e["params"] for e in browser.events if e.get("method") == "Network.loadingFailed"]
    assert not failed, failed
    exceptions = [e["params"] for e in browser.events if e.get("method") == "Runtime.exceptionThrown"]
    assert not exceptions, exceptions
    # A request that a Content-Security-Policy blocked, or a script error, is logged as an error.
    errors = [e["params"]["entry"] for e in browser.events
              if e.get("method") == "Log.entryAdded" and e["params"]["entry"].get("level") == "error"]
    assert not errors, errors
    before, zoomed, after = zoom
    assert zoomed < before and after == before, zoom

