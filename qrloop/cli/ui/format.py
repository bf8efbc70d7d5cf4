"""Formatting shared by the status page and the terminal summary."""

from __future__ import annotations


def number(value: object, spec: str) -> str:
    """A number formatted with ``spec``; a missing statistic (an analysis without enough samples) is "–"."""
    if not isinstance(value, int | float) or isinstance(value, bool):
        return "–"
    try:
        return format(value, spec)
    except ValueError:  # "d" of a float: a new statistic's type must not break the page
        return str(value)
