"""The Jaeger config that the testbed writes: valid YAML, loopback-only, the requested ports.

A regression here would either expose an unauthenticated trace store on the network or
leave Jaeger listening on a port the tracer does not export to, so both are checked on the
parsed YAML rather than on the text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from ollama_tracer.testbed.jaeger import _wrapper_go_mod, write_jaeger_config


def _endpoints(cfg: dict[str, Any]) -> dict[str, str]:
    """Every ``endpoint`` value in the config, keyed by its dotted path."""
    found: dict[str, str] = {}

    def walk(node: Any, where: str) -> None:
        if isinstance(node, dict):
            for key, value in node.items():
                here = f"{where}.{key}" if where else str(key)
                if key == "endpoint":
                    found[here] = str(value)
                else:
                    walk(value, here)

    walk(cfg, "")
    return found


def _load(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def test_default_ports_all_loopback(tmp_path: Path) -> None:
    cfg = _load(write_jaeger_config(tmp_path / "jaeger.yaml"))
    assert _endpoints(cfg) == {
        "extensions.jaeger_query.http.endpoint": "127.0.0.1:16686",
        "extensions.jaeger_query.grpc.endpoint": "127.0.0.1:16685",
        "receivers.otlp.protocols.grpc.endpoint": "127.0.0.1:4317",
        "receivers.otlp.protocols.http.endpoint": "127.0.0.1:4318",
    }


def test_custom_ports(tmp_path: Path) -> None:
    path = write_jaeger_config(
        tmp_path / "sub" / "jaeger.yaml",
        otlp_grpc_port=24317,
        otlp_http_port=24318,
        query_port=26686,
        query_grpc_port=26685,
    )
    endpoints = _endpoints(_load(path))
    assert endpoints["receivers.otlp.protocols.grpc.endpoint"] == "127.0.0.1:24317"
    assert endpoints["receivers.otlp.protocols.http.endpoint"] == "127.0.0.1:24318"
    assert endpoints["extensions.jaeger_query.http.endpoint"] == "127.0.0.1:26686"
    assert endpoints["extensions.jaeger_query.grpc.endpoint"] == "127.0.0.1:26685"
    for endpoint in endpoints.values():
        assert endpoint.rsplit(":", 1)[0] == "127.0.0.1"


def test_only_non_listening_components_besides_otlp_and_query(tmp_path: Path) -> None:
    """Anything else that listens (health check, zpages, 8888 metrics...) must stay out."""
    cfg = _load(write_jaeger_config(tmp_path / "jaeger.yaml"))
    service = cfg["service"]
    assert service["extensions"] == ["jaeger_storage", "jaeger_query"]
    assert set(cfg["extensions"]) == {"jaeger_storage", "jaeger_query"}
    assert service["pipelines"]["traces"]["receivers"] == ["otlp"]
    assert set(cfg["receivers"]) == {"otlp"}
    assert service["telemetry"]["metrics"] == {"level": "none"}
    # The pipeline ends in the in-memory store the query extension reads.
    store = cfg["extensions"]["jaeger_query"]["storage"]["traces"]
    assert "memory" in cfg["extensions"]["jaeger_storage"]["backends"][store]
    assert cfg["exporters"]["jaeger_storage_exporter"]["trace_storage"] == store


def test_ipv6_loopback_is_bracketed(tmp_path: Path) -> None:
    cfg = _load(write_jaeger_config(tmp_path / "jaeger.yaml", host="::1"))
    assert set(_endpoints(cfg).values()) == {"[::1]:16686", "[::1]:16685", "[::1]:4317", "[::1]:4318"}


@pytest.mark.parametrize("ports", [{"otlp_grpc_port": 0}, {"query_port": 70000}, {"otlp_http_port": 4317}])
def test_bad_ports_rejected(tmp_path: Path, ports: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        write_jaeger_config(tmp_path / "jaeger.yaml", **ports)


def test_wrapper_go_mod_repeats_replaces() -> None:
    text = _wrapper_go_mod(
        "1.24.6",
        [
            {
                "Old": {"Path": "github.com/Shopify/sarama"},
                "New": {"Path": "github.com/Shopify/sarama", "Version": "v1.33.0"},
            },
            {"Old": {"Path": "example.com/local"}, "New": {"Path": "./local"}},
        ],
        [{"Path": "example.com/bad", "Version": "v0.1.0"}],
    )
    lines = text.splitlines()
    assert "go 1.24.6" in lines
    assert "require github.com/jaegertracing/jaeger v1.76.0" in lines
    assert "replace github.com/Shopify/sarama => github.com/Shopify/sarama v1.33.0" in lines
    assert "exclude example.com/bad v0.1.0" in lines
    assert not any(line.startswith("replace example.com/local") for line in lines)
