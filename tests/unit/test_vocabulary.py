"""The vocabulary module owns every phase name and attribute key: code uses its constants."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from ollama_tracer import vocabulary as v

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = (ROOT / "tracer", ROOT / "collectors")
ATTRIBUTION = ROOT / "tracer" / "attribution"
VOCABULARY = ROOT / "tracer" / "vocabulary.py"

# A whole literal that names a phase (or a merge of phases), e.g. "server.decode+model_lookup".
PHASE_LITERAL = re.compile(r"^(client|server|runner|proxy)\.[a-z_]+(\+[a-z_]+(\.[a-z_]+)?)*$")
# A whole literal that is an attribute key or a phase: "tracer.first_token_ns", "gen_ai.request.model", ...
KEY_LITERAL = re.compile(r"^(client|server|runner|proxy|tracer|ollama|gen_ai)\.[a-z_]+([.+][a-z_.]+)*$")
# Not phases, though spelled like them: span attribute keys and span names (vocabulary has them too).
NOT_PHASES = {v.SERVER_FD, v.SERVER_PID, v.SERVER_ADDRESS, v.SERVER_PORT, v.CLIENT_ADDRESS, v.CLIENT_PORT,
              v.SPAN_SERVER_REQUEST}


def _string_literals(path: Path) -> list[tuple[int, str]]:
    """Every str constant in the file, f-string pieces included, with its line."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return [(node.lineno, node.value) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str)]


def _sources(*dirs: Path) -> list[Path]:
    return sorted(p for d in dirs for p in d.rglob("*.py") if p != VOCABULARY)


def test_no_phase_name_is_typed_outside_the_vocabulary() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}" for path in _sources(*PACKAGE_DIRS)
             for line, text in _string_literals(path) if PHASE_LITERAL.match(text) and text not in NOT_PHASES]
    assert found == [], "phase names typed as literals (use ollama_tracer.vocabulary):\n" + "\n".join(found)


def test_attribution_types_no_attribute_key_or_phase() -> None:
    found = [f"{path.relative_to(ROOT)}:{line}: {text!r}" for path in _sources(ATTRIBUTION)
             for line, text in _string_literals(path) if KEY_LITERAL.match(text)]
    assert found == [], "keys typed as literals (use ollama_tracer.vocabulary):\n" + "\n".join(found)


def test_the_literal_check_sees_a_phase() -> None:
    assert PHASE_LITERAL.match("server.decode+model_lookup")
    assert PHASE_LITERAL.match("server.handoff+runner.admit")
    assert PHASE_LITERAL.match(v.CLIENT_INTERRUPT)
    assert not PHASE_LITERAL.match("server.decode and more")


def test_merged_name_rule() -> None:
    assert v.merged_name([v.SERVER_RECEIVE, v.SERVER_DECODE]) == "server.receive+decode"
    assert v.merged_name([v.SERVER_HANDOFF, v.RUNNER_ADMIT]) == "server.handoff+runner.admit"
    assert v.merged_name([v.SERVER_DECODE, v.SERVER_MODEL_LOOKUP, v.SERVER_SCHEDULE]) == \
        "server.decode+model_lookup+schedule"
    assert v.merged_name([v.SERVER_SCHEDULE, v.SERVER_HANDOFF, v.RUNNER_ADMIT]) == \
        "server.schedule+handoff+runner.admit"
    assert v.merged_name([v.RUNNER_PREFILL, v.RUNNER_SAMPLE]) == "runner.prefill+sample"
    assert v.merged_name([v.SERVER_STREAM]) == "server.stream"


DESIGN_ORDER = (
    "client.interrupt", "client.request", "server.receive", "server.decode", "server.model_lookup",
    "server.schedule", "server.handoff", "runner.admit", "runner.prefill", "runner.sample", "server.stream",
    "client.first_token",
)


def test_critical_path_is_in_design_order() -> None:
    assert v.CRITICAL_PATH == DESIGN_ORDER
    assert v.SERVER_CANCEL not in v.CRITICAL_PATH
    assert v.OFF_CRITICAL_PATH == (v.SERVER_CANCEL,)


def test_critical_path_matches_the_phase_table_in_docs() -> None:
    """docs/architecture.md's phase table lists the critical path in the same order."""
    text = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\| `([a-z_.]+)` \|", text, flags=re.MULTILINE)
    assert tuple(row for row in rows if row in v.CRITICAL_PATH) == v.CRITICAL_PATH


def test_values() -> None:
    # The names are the capture's contract: changing one is a schema change, not a refactor.
    assert (v.PROCESS_CLIENT, v.PROCESS_SERVER, v.PROCESS_RUNNER, v.PROCESS_PROXY) == \
        ("client", "server", "runner", "proxy")
    assert v.SOURCES == ("client", "ebpf", "log", "response")
    by_old_rule = {name: name.replace("client.", "proxy.") for name in (v.CLIENT_REQUEST, v.CLIENT_FIRST_TOKEN)}
    assert by_old_rule == v.PROXY_PHASE_OF
    assert all(name.startswith(v.process_prefix(name.split(".")[0])) for name in v.CRITICAL_PATH)
    assert v.GEN_AI_REQUEST_MODEL == "gen_ai.request.model"
    assert v.GEN_AI_PROVIDER_NAME == "gen_ai.provider.name"
    assert v.GEN_AI_RESPONSE_TIME_TO_FIRST_CHUNK == "gen_ai.response.time_to_first_chunk"
    assert (v.SERVER_ADDRESS, v.SERVER_PORT, v.CLIENT_ADDRESS, v.CLIENT_PORT) == \
        ("server.address", "server.port", "client.address", "client.port")
    assert v.TRACER_FIRST_TOKEN_NS == "tracer.first_token_ns"
    assert v.OLLAMA_TIMING_ATTRIBUTES["total_duration"] == v.OLLAMA_TOTAL_DURATION == "ollama.total_duration"
    assert all(key == v.OLLAMA_PREFIX + field for field, key in v.OLLAMA_TIMING_ATTRIBUTES.items())
