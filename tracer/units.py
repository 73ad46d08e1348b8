"""Milliseconds as the outputs print them. Inside the program every time is integer epoch ns."""

from __future__ import annotations

import math

NO_VALUE = "—"


def format_ms(value: float | None, *, digits: int | None = 2, signed: bool = False, unit: bool = False) -> str:
    """``12.3456`` → ``"12.35"``; None or NaN → ``"—"``. ``digits=None`` shows 1 decimal from 1 ms
    up and 2 below it; ``signed`` always shows the sign; ``unit`` appends `` ms``."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return NO_VALUE
    places = (1 if abs(value) >= 1 else 2) if digits is None else digits
    text = f"{value:+.{places}f}" if signed else f"{value:.{places}f}"
    return f"{text} ms" if unit else text


def accuracy_statement() -> str | None:
    """One sentence on how accurate the attribution was the last time it was measured against
    ground truth (``benchmarks/accuracy.py --record`` writes ``accuracy.json`` beside this module,
    and it ships with the package); None when it was never recorded."""
    import json
    from pathlib import Path

    try:
        record = json.loads((Path(__file__).with_name("accuracy.json")).read_text(encoding="utf-8"))
        worst = record.get("worst") or {}
        return (f"Accuracy, last measured {record['date']} by benchmarks/accuracy.py on Ollama "
                f"{', '.join(record['versions'])}: {record['right_phase']}/{record['cases']} injected cases in "
                f"the right phase, {record['on_target']}/{record['timed']} timed ones within 1 ms or 5 % "
                f"(worst {format_ms(worst.get('error_ms'), signed=True, unit=True)} on "
                f"{format_ms(worst.get('injected_ms'), unit=True)} in {worst.get('phase')}).")
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
