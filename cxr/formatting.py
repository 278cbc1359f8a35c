"""Figures as people read them: rounded, with a real minus sign and intervals as "a to b"."""

from __future__ import annotations

import math

MINUS = "\u2212"


def num(value: float | None, digits: int = 3) -> str:
    """``value`` rounded to ``digits`` decimals, negative numbers with a minus sign (U+2212).

    Args:
        value: the figure; None or NaN read "n/a".
        digits: decimals kept.

    Returns:
        For example ``"0.912"``, ``"−0.038"`` or ``"n/a"``.
    """
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    text = f"{float(value):.{digits}f}"
    if text.startswith("-"):
        text = text[1:] if float(text) == 0 else MINUS + text[1:]
    return text


def interval(low: float | None, high: float | None, digits: int = 3) -> str:
    """A confidence interval as ``"−0.038 to −0.010"`` (never ``"-0.038–-0.010"``).

    Args:
        low: the lower end (None or NaN: "n/a").
        high: the upper end.
        digits: decimals kept.

    Returns:
        The two ends joined by " to ".
    """
    return f"{num(low, digits)} to {num(high, digits)}"
