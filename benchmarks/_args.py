"""Argument checks shared by the benchmark scripts: a bad flag value is a one-line `ap.error`, exit 2.

The type helpers raise argparse.ArgumentTypeError("VALUE is invalid: must be ..."); `Parser` prints them as

    SCRIPT: error: --repeats 0 is invalid: must be an integer >= 1

(after argparse's usage line), before anything slow is loaded or started.
"""

from __future__ import annotations

import argparse
import math
import re


class Parser(argparse.ArgumentParser):
    """argparse.ArgumentParser whose type errors read `--flag VALUE is invalid: must be ...`."""

    def error(self, message: str):  # noqa: D401  (argparse's hook: prints usage + one line, exits 2)
        m = re.match(r"argument (\S+?)(?:/(\S+))?: (.*)$", message, re.S)
        if m and " is invalid: " in m.group(3):
            message = f"{m.group(2) or m.group(1)} {m.group(3)}"
        super().error(" ".join(message.split()))  # never more than one line


def _bad(text: str, rule: str) -> argparse.ArgumentTypeError:
    return argparse.ArgumentTypeError(f"{text} is invalid: {rule}")


def _int(text: str, low: int) -> int:
    try:
        value = int(text)
    except (TypeError, ValueError):
        raise _bad(text, f"must be an integer >= {low}") from None
    if value < low:
        raise _bad(text, f"must be an integer >= {low}")
    return value


def int_at_least(low: int):
    """An argument type: an integer >= `low`."""
    return lambda text: _int(text, low)


def positive_int(text: str) -> int:
    """An integer >= 1."""
    return _int(text, 1)


def nonneg_int(text: str) -> int:
    """An integer >= 0."""
    return _int(text, 0)


def _float(text: str, positive: bool) -> float:
    rule = "must be a number > 0" if positive else "must be a number >= 0"
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _bad(text, rule) from None
    if not math.isfinite(value) or value < 0 or (positive and value == 0):
        raise _bad(text, rule)
    return value


def positive_float(text: str) -> float:
    """A finite number > 0."""
    return _float(text, True)


def nonneg_float(text: str) -> float:
    """A finite number >= 0."""
    return _float(text, False)


def fraction(text: str) -> float:
    """A number > 0 and <= 1."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        raise _bad(text, "must be a number > 0 and <= 1") from None
    if not 0 < value <= 1:
        raise _bad(text, "must be a number > 0 and <= 1")
    return value


def int_list(text: str) -> list[int]:
    """Comma-separated integers >= 1, at least one, no repeats: '1,4,8'."""
    rule = "must be integers >= 1 separated by commas, e.g. 1,4,8 (no repeats)"
    parts = [x.strip() for x in str(text).split(",")]
    try:
        values = [int(x) for x in parts]
    except ValueError:
        raise _bad(text, rule) from None
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise _bad(text, rule)
    return values


def choice_list(allowed: tuple[str, ...]):
    """A type: comma-separated names out of `allowed`, at least one, no repeats: 'fp32,int8'."""

    def parse(text: str) -> list[str]:
        values = [x.strip() for x in str(text).split(",")]
        if not values or any(v not in allowed for v in values) or len(set(values)) != len(values):
            raise _bad(text, f"must be one or more of {', '.join(allowed)}, comma-separated (no repeats)")
        return values

    parse.__name__ = "choice_list"
    return parse
