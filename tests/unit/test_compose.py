"""docker-compose.yml: no Docker engine here, so check the file's structure."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

COMPOSE = Path(__file__).resolve().parents[2] / "docker-compose.yml"


def _services() -> dict[str, Any]:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(compose, dict)
    services: dict[str, Any] = compose["services"]
    return services


def test_services_and_pinned_images() -> None:
    services = _services()
    assert set(services) == {"jaeger", "ollama", "ollama-gpu"}
    assert services["jaeger"]["image"] == "jaegertracing/jaeger:2.13.0"
    assert services["ollama"]["image"] == "ollama/ollama:0.13.5"
    assert services["ollama-gpu"]["image"] == "ollama/ollama:0.13.5"


def test_ports_are_published_on_loopback_only() -> None:
    services = _services()
    assert services["jaeger"]["ports"] == ["127.0.0.1:16686:16686", "127.0.0.1:4317:4317", "127.0.0.1:4318:4318"]
    assert services["ollama"]["ports"] == ["127.0.0.1:11434:11434"]
    assert services["ollama-gpu"]["ports"] == ["127.0.0.1:11435:11434"]
    for service in services.values():
        for port in service.get("ports", []):
            assert isinstance(port, str) and port.startswith("127.0.0.1:"), port


def test_ollama_debug_and_model_volume() -> None:
    compose = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    for name in ("ollama", "ollama-gpu"):
        service = compose["services"][name]
        assert service["environment"]["OLLAMA_DEBUG"] == "1"
        (volume,) = service["volumes"]
        volume_name, target = volume.split(":")
        assert target == "/root/.ollama"
        assert volume_name in compose["volumes"]  # a named volume, not a bind mount


def test_gpu_profile_reserves_nvidia_devices() -> None:
    services = _services()
    assert "profiles" not in services["ollama"] and "profiles" not in services["jaeger"]
    gpu = services["ollama-gpu"]
    assert gpu["profiles"] == ["gpu"]
    (device,) = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert device == {"driver": "nvidia", "count": "all", "capabilities": ["gpu"]}
