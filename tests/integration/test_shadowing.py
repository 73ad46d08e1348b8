"""An app with its own `tracer.py`, `collectors/` and `sitecustomize.py` runs the same traced and untraced.

Before the package became `ollama_tracer`, `tracer capture -- python app.py` broke such an app: our
sitecustomize imported our `tracer` first, so the app's `import tracer` got ours. The app below
reports what it imported; the report must be the same plainly, under `capture` and under `run`,
and its Ollama call must still be traced.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from ollama_tracer.collectors.otlp_receiver import OtlpReceiver

from tests.conftest import run_tracer_healing

pytestmark = pytest.mark.integration

MODEL = "tracer-llama:test"
SPAN_NAME = f"text_completion {MODEL}"
TIMEOUT_S = 180

APP_TRACER = 'APP_TRACER = "mine"\n'
APP_COLLECTORS = 'APP_COLLECTORS = "mine"\n'

# Records each run as (pid, argv): `tracer run` execs the app in its own process, so the pid alone
# would count the launcher's start-up (PYTHONPATH reaches it too) as the app's.
APP_SITECUSTOMIZE = textwrap.dedent(
    """
    import json as _json
    import os as _os
    import sys as _sys

    APP_SITE_MARKER = "mine"
    NAME_AT_EXEC = __name__
    with open(_os.path.join(_os.path.dirname(_os.path.abspath(__file__)), "site_runs.jsonl"), "a") as _out:
        _out.write(_json.dumps({"pid": _os.getpid(), "argv": _sys.orig_argv, "name": __name__}) + "\\n")
    """
)

APP = textwrap.dedent(
    """
    import json
    import os
    import sys

    import requests

    import collectors
    import sitecustomize
    import tracer

    here = os.path.dirname(os.path.abspath(__file__))
    with open(os.path.join(here, "site_runs.jsonl")) as runs:
        mine = [json.loads(line) for line in runs]
    mine = [r for r in mine if r["pid"] == os.getpid() and r["argv"] == sys.orig_argv]

    host = os.environ["OLLAMA_HOST"]
    response = requests.post(f"{host}/api/generate", stream=True, timeout=60, json={
        "model": "MODEL", "prompt": "Say hi", "stream": True, "options": {"num_predict": 3},
    })
    response.raise_for_status()
    chunks = [json.loads(line) for line in response.iter_lines() if line]
    response.close()

    report = {
        "tracer_file": tracer.__file__,
        "tracer_marker": getattr(tracer, "APP_TRACER", None),
        "collectors_file": collectors.__file__,
        "collectors_marker": getattr(collectors, "APP_COLLECTORS", None),
        "sitecustomize_file": sitecustomize.__file__,
        "sitecustomize_marker": getattr(sitecustomize, "APP_SITE_MARKER", None),
        "sitecustomize_name": getattr(sitecustomize, "NAME_AT_EXEC", None),
        "sitecustomize_runs": [r["name"] for r in mine],
        # Nothing of ours may sit under the app's module names (a submodule would betray it).
        "shadowed_names": sorted(m for m in sys.modules if m.split(".")[0] in ("tracer", "collectors")),
        "stream_done": bool(chunks) and chunks[-1].get("done") is True,
    }
    with open(sys.argv[1], "w") as out:
        json.dump(report, out, sort_keys=True)
    """
).replace("MODEL", MODEL)


def _app(root: Path) -> Path:
    app = root / "app"
    (app / "collectors").mkdir(parents=True)
    (app / "tracer.py").write_text(APP_TRACER)
    (app / "collectors" / "__init__.py").write_text(APP_COLLECTORS)
    (app / "sitecustomize.py").write_text(APP_SITECUSTOMIZE)
    (app / "app.py").write_text(APP)
    return app


def _expected(app: Path) -> dict[str, Any]:
    return {
        "tracer_file": str(app / "tracer.py"),
        "tracer_marker": "mine",
        "collectors_file": str(app / "collectors" / "__init__.py"),
        "collectors_marker": "mine",
        "sitecustomize_file": str(app / "sitecustomize.py"),
        "sitecustomize_marker": "mine",
        "sitecustomize_name": "sitecustomize",
        "sitecustomize_runs": ["sitecustomize"],  # exactly once in the app's process
        "shadowed_names": ["collectors", "tracer"],
        "stream_done": True,
    }


def _env(app: Path, testbed: dict[str, Any]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OTEL_", "TRACER_"))}
    env.update(PYTHONPATH=str(app), OLLAMA_HOST=testbed["ollama_host"], PYTHONUNBUFFERED="1")
    return env


def _report(path: Path) -> dict[str, Any]:
    assert path.exists(), f"the app wrote no report at {path}"
    result: dict[str, Any] = json.loads(path.read_text())
    return result


def _generate_spans(spans: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [s for s in spans if s.get("name") == SPAN_NAME and s["attributes"].get("gen_ai.request.model") == MODEL]


def test_an_app_with_its_own_tracer_collectors_and_sitecustomize(testbed: dict[str, Any], tmp_path: Path) -> None:
    app = _app(tmp_path)
    expected = _expected(app)
    env = _env(app, testbed)

    # (a) plainly: what the app sees without us.
    plain = subprocess.run([sys.executable, "app.py", str(tmp_path / "plain.json")], cwd=app, env=env,
                           capture_output=True, text=True, timeout=TIMEOUT_S, check=False)
    assert plain.returncode == 0, plain.stderr
    assert _report(tmp_path / "plain.json") == expected

    # (b) under `tracer capture`, with the same PYTHONPATH.
    cap = tmp_path / "cap"
    captured = run_tracer_healing(
        testbed, "capture", "-o", str(cap), "--force", "--ollama-host", testbed["ollama_host"], "--",
        sys.executable, "app.py", str(tmp_path / "capture.json"), timeout=TIMEOUT_S, env=env, cwd=str(app),
    )
    assert captured.returncode == 0, captured.stderr
    assert "auto-instrumentation" not in captured.stderr, captured.stderr  # it did not fail quietly
    assert _report(tmp_path / "capture.json") == expected
    raw = [json.loads(line) for line in (cap / "raw" / "client_spans.jsonl").read_text().splitlines() if line]
    assert len(_generate_spans(raw)) == 1, [s["name"] for s in raw]
    exported = [json.loads(line) for line in (cap / "spans.jsonl").read_text().splitlines() if line]
    assert len(_generate_spans(exported)) == 1

    # (c) under `tracer run`, spans to a receiver of our own.
    with OtlpReceiver() as receiver:
        ran = run_tracer_healing(
            testbed, "run", "--otlp-endpoint", receiver.grpc_endpoint, "--",
            sys.executable, "app.py", str(tmp_path / "run.json"), timeout=TIMEOUT_S, env=env, cwd=str(app),
        )
        assert ran.returncode == 0, ran.stderr
        assert "auto-instrumentation" not in ran.stderr, ran.stderr
        deadline = time.monotonic() + 20  # the exporter flushes at exit; the receiver may lag a little
        while not _generate_spans(receiver.spans()) and time.monotonic() < deadline:
            time.sleep(0.2)
        received = _generate_spans(receiver.spans())
    assert _report(tmp_path / "run.json") == expected
    assert len(received) == 1
    assert received[0]["resource"]["service.name"] == "ollama-client"
