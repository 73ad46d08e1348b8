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
