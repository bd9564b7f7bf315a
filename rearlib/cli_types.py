"""argparse ``type=`` functions shared by the command-line tools: each rejects a value that would otherwise be
accepted and fail later, or silently do nothing (argparse names the option in its error)."""

from __future__ import annotations

import argparse
import math

__all__ = ["count", "finite_float", "positive_seconds", "shard"]


def finite_float(text: str) -> float:
    """A float that is not inf or nan."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def count(text: str) -> int:
    """An integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def positive_seconds(text: str) -> float:
    """A time limit: positive and finite (a limit that lets nothing run would exit 0 having done nothing)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of seconds, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a positive, finite number of seconds, got {text!r} "
                                         f"(leave the option out for no limit)")
    return value


def shard(text: str) -> tuple[int, int]:
    """``"I/N"`` with 0 <= I < N: share I of a plan split N ways."""
    index, sep, total = text.partition("/")
    try:
        i, n = int(index), int(total)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected I/N such as 0/4, got {text!r}") from None
    if not sep or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"expected I/N with 0 <= I < N, got {text!r}")
    return i, n
