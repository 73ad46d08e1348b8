"""The collectors a capture runs, in start order. Adding a source: one line here."""

from __future__ import annotations

from collectors.base import Collector
from collectors.otlp import OtlpCollector


def make_collectors() -> list[Collector]:
    return [OtlpCollector()]
