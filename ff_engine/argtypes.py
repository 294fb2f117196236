"""argparse pieces every command-line front end shares: ``ff-engine``, ``ff-engine serve``, the benchmarks.

A module of its own (not ``cli``) so the server's and the benchmarks' parsers get the one-line error contract
without importing the CLI that dispatches to them, which was an import circle.
"""

from __future__ import annotations

import argparse
import math


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line (no usage dump), exit code 2 (the benchmarks use it too)."""

    def error(self, message):
        self.exit(2, f"{self.prog.split()[0]}: error: {message}\n")


def positive_float(s: str) -> float:
    """argparse type: a finite number > 0."""
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {s!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {s}")
    return v


def fraction(s: str) -> float:
    """argparse type: a number in (0, 1]."""
    v = positive_float(s)
    if v > 1:
        raise argparse.ArgumentTypeError(f"must be a number in (0, 1], got {s}")
    return v


def int_arg(lo: int, hi: int | None = None):
    """argparse type: an integer in [lo, hi] (argparse names the flag in its one-line error)."""
    allowed = f"an integer >= {lo}" if hi is None else f"an integer in [{lo}, {hi}]"

    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {s!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {allowed}, got {s}")
        return v
    return parse
